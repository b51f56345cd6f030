//! The persistent B+tree that holds a snapshot: a sorted map of byte keys to
//! byte values, stored as content-addressed nodes. Applying a sorted batch of
//! changes rewrites only the nodes on the paths to the changed keys, so a
//! commit costs O(changes x depth), never O(size).

use crate::error::Result;
use crate::id::Id;
use crate::object::{encode_node, Node};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Nodes are split when their entries exceed this many bytes...
const NODE_MAX: usize = 8 * 1024;
/// ...into pieces of about this many bytes.
const NODE_TARGET: usize = 4 * 1024;

/// Reads tree nodes by id (with caching, in the store).
pub trait NodeSource {
    fn node(&self, id: &Id) -> Result<Arc<Node>>;
}

/// Nodes written by [`apply`]: (id, stored form).
pub type NewNodes = Vec<(Id, Vec<u8>)>;

/// One change of a batch: `None` deletes the key.
pub type Mutation = (Vec<u8>, Option<Vec<u8>>);

/// The id and stored form of the empty tree.
pub fn empty() -> (Id, Vec<u8>) {
    encode_node(&Node::Leaf(Vec::new()))
}

/// Looks up `key` in the tree rooted at `root`.
pub fn get(src: &dyn NodeSource, root: &Id, key: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut id = *root;
    loop {
        let node = src.node(&id)?;
        match &*node {
            Node::Leaf(entries) => {
                return Ok(entries
                    .binary_search_by(|(k, _)| k.as_slice().cmp(key))
                    .ok()
                    .map(|i| entries[i].1.clone()))
            }
            Node::Inner(children) => match child_index(children, key) {
                Some(i) => id = children[i].1,
                None => return Ok(None),
            },
        }
    }
}

/// Index of the child whose range holds `key` (the last one whose lower
/// bound is <= key, or the first).
fn child_index(children: &[(Vec<u8>, Id)], key: &[u8]) -> Option<usize> {
    if children.is_empty() {
        return None;
    }
    let n = children.partition_point(|(k, _)| k.as_slice() <= key);
    Some(n.saturating_sub(1))
}

/// A cursor over the entries of a tree in key order.
pub struct Cursor<'a> {
    src: &'a dyn NodeSource,
    /// Path from the root: (node, index of the next child/entry to visit).
    stack: Vec<(Arc<Node>, usize)>,
}

impl<'a> Cursor<'a> {
    /// A cursor positioned at the first entry >= `start`.
    pub fn seek(src: &'a dyn NodeSource, root: &Id, start: &[u8]) -> Result<Cursor<'a>> {
        let mut stack = Vec::new();
        let mut id = *root;
        loop {
            let node = src.node(&id)?;
            match &*node {
                Node::Leaf(entries) => {
                    let i = entries.partition_point(|(k, _)| k.as_slice() < start);
                    stack.push((node.clone(), i));
                    break;
                }
                Node::Inner(children) => {
                    let Some(i) = child_index(children, start) else {
                        stack.push((node.clone(), 0));
                        break;
                    };
                    let child = children[i].1;
                    stack.push((node.clone(), i + 1));
                    id = child;
                }
            }
        }
        Ok(Cursor { src, stack })
    }

    /// The next (key, value), or None at the end.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        loop {
            let Some((node, idx)) = self.stack.last_mut() else {
                return Ok(None);
            };
            match &**node {
                Node::Leaf(entries) => {
                    if let Some(e) = entries.get(*idx) {
                        *idx += 1;
                        return Ok(Some(e.clone()));
                    }
                    self.stack.pop();
                }
                Node::Inner(children) => {
                    if let Some((_, child)) = children.get(*idx) {
                        let child = *child;
                        *idx += 1;
                        let n = self.src.node(&child)?;
                        self.stack.push((n, 0));
                    } else {
                        self.stack.pop();
                    }
                }
            }
        }
    }
}

/// The keys whose values differ between the trees at `a` and `b` (present
/// in one only, or with different values), in key order. Subtrees the two
/// trees share (the same node id at the same height) are skipped, so a few
/// changes to a large tree cost a few paths of nodes, not the whole tree.
pub fn changed_keys(src: &dyn NodeSource, a: &Id, b: &Id) -> Result<Vec<Vec<u8>>> {
    if a == b {
        return Ok(Vec::new());
    }
    let mut sides = [Side::new(src, a)?, Side::new(src, b)?];
    loop {
        // Shared subtrees hold the same entries on both sides, and their
        // keys are nowhere else in either tree: both drop them.
        let ids: [HashSet<Id>; 2] = [sides[0].ids(), sides[1].ids()];
        sides[0].nodes.retain(|id| !ids[1].contains(id));
        sides[1].nodes.retain(|id| !ids[0].contains(id));
        // Nodes are compared at the same height: the taller side goes
        // down first.
        let top = sides[0].height.max(sides[1].height);
        if top == 0 {
            break;
        }
        for side in sides.iter_mut().filter(|s| s.height == top) {
            side.descend(src)?;
        }
    }
    let [old, new] = sides;
    let (old, new) = (old.entries(src)?, new.entries(src)?);
    let mut out: Vec<Vec<u8>> = Vec::new();
    for (k, v) in &old {
        if new.get(k) != Some(v) {
            out.push(k.to_vec());
        }
    }
    out.extend(
        new.keys()
            .filter(|k| !old.contains_key(*k))
            .map(|k| k.to_vec()),
    );
    out.sort();
    Ok(out)
}

/// One tree's nodes not yet known to be shared, all of one height (0:
/// leaves), for [`changed_keys`]. Held by id: a node is read only if the
/// other tree does not have it.
struct Side {
    nodes: Vec<Id>,
    height: usize,
}

impl Side {
    fn new(src: &dyn NodeSource, root: &Id) -> Result<Side> {
        // Every leaf of a tree is at the same depth: the leftmost path's.
        let mut height = 0;
        let mut n = src.node(root)?;
        while let Node::Inner(children) = &*n {
            let Some((_, first)) = children.first() else {
                break;
            };
            n = src.node(first)?;
            height += 1;
        }
        Ok(Side {
            nodes: vec![*root],
            height,
        })
    }

    fn ids(&self) -> HashSet<Id> {
        self.nodes.iter().copied().collect()
    }

    /// Replaces every node by its children.
    fn descend(&mut self, src: &dyn NodeSource) -> Result<()> {
        let mut next = Vec::new();
        for id in std::mem::take(&mut self.nodes) {
            match &*src.node(&id)? {
                Node::Inner(children) => next.extend(children.iter().map(|(_, c)| *c)),
                // Not at the height of its tree's other leaves (not a tree
                // `apply` made): compared as it is.
                Node::Leaf(_) => next.push(id),
            }
        }
        self.nodes = next;
        self.height = self.height.saturating_sub(1);
        Ok(())
    }

    /// The entries of the (leaf) nodes left.
    fn entries(self, src: &dyn NodeSource) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for id in self.nodes {
            if let Node::Leaf(entries) = &*src.node(&id)? {
                out.extend(entries.iter().cloned());
            }
        }
        Ok(out)
    }
}

/// Applies sorted, key-unique `muts` to the tree at `root`. Returns the new
/// root and every node written (id, stored form), to be stored in the same
/// write batch as whatever refers to the new root.
pub fn apply(src: &dyn NodeSource, root: &Id, muts: &[Mutation]) -> Result<(Id, NewNodes)> {
    let mut out = Vec::new();
    if muts.is_empty() {
        return Ok((*root, out));
    }
    let mut level = apply_node(src, root, muts, &mut out)?;
    // Grow: more than one node at the top gets a new root above it.
    while level.len() > 1 {
        level = split_inner(level, &mut out);
    }
    let mut root = match level.pop() {
        Some((_, id)) => id,
        None => {
            let (id, bytes) = empty();
            out.push((id, bytes));
            id
        }
    };
    // Shrink: an inner root with one child is replaced by the child.
    loop {
        let node = match out.iter().find(|(id, _)| *id == root) {
            Some((id, bytes)) => Arc::new(crate::object::decode_node(id, bytes)?),
            None => src.node(&root)?,
        };
        match &*node {
            Node::Inner(children) if children.len() == 1 => root = children[0].1,
            _ => break,
        }
    }
    Ok((root, out))
}

fn apply_node(
    src: &dyn NodeSource,
    id: &Id,
    muts: &[Mutation],
    out: &mut NewNodes,
) -> Result<Vec<(Vec<u8>, Id)>> {
    let node = src.node(id)?;
    match &*node {
        Node::Leaf(entries) => {
            let merged = merge_leaf(entries, muts);
            Ok(split_leaf(merged, out))
        }
        Node::Inner(children) => {
            if children.is_empty() {
                let (eid, _) = empty();
                return apply_node(src, &eid, muts, out);
            }
            let mut new_children: Vec<(Vec<u8>, Id)> = Vec::with_capacity(children.len() + 2);
            let mut m = 0;
            for (i, (lower, child)) in children.iter().enumerate() {
                // Mutations for child i: keys below the next child's bound
                // (all keys below the first bound go to child 0).
                let end = match children.get(i + 1) {
                    Some((next, _)) => m + muts[m..].partition_point(|(k, _)| k < next),
                    None => muts.len(),
                };
                if end == m {
                    new_children.push((lower.clone(), *child));
                    continue;
                }
                let replaced = apply_node(src, child, &muts[m..end], out)?;
                new_children.extend(replaced);
                m = end;
            }
            if new_children.is_empty() {
                return Ok(Vec::new());
            }
            Ok(split_inner(new_children, out))
        }
    }
}

fn merge_leaf(entries: &[(Vec<u8>, Vec<u8>)], muts: &[Mutation]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::with_capacity(entries.len() + muts.len());
    let (mut i, mut j) = (0, 0);
    while i < entries.len() || j < muts.len() {
        let take_mut = match (entries.get(i), muts.get(j)) {
            (Some((ek, _)), Some((mk, _))) => {
                if mk == ek {
                    i += 1; // replaced or deleted
                    true
                } else {
                    mk < ek
                }
            }
            (None, Some(_)) => true,
            _ => false,
        };
        if take_mut {
            if let (k, Some(v)) = &muts[j] {
                out.push((k.clone(), v.clone()));
            }
            j += 1;
        } else {
            out.push(entries[i].clone());
            i += 1;
        }
    }
    out
}

fn entry_size(k: &[u8], v: usize) -> usize {
    k.len() + v + 4
}

fn split_leaf(entries: Vec<(Vec<u8>, Vec<u8>)>, out: &mut NewNodes) -> Vec<(Vec<u8>, Id)> {
    split(entries, |v| v.len(), Node::Leaf, out)
}

fn split_inner(children: Vec<(Vec<u8>, Id)>, out: &mut NewNodes) -> Vec<(Vec<u8>, Id)> {
    split(children, |_| 32, Node::Inner, out)
}

/// Cuts sorted entries into nodes of at most NODE_MAX bytes (pieces of about
/// NODE_TARGET when they must be cut), stores each in `out`, and returns
/// (first key, id) per node. `value_len` sizes an entry's value.
fn split<T>(
    entries: Vec<(Vec<u8>, T)>,
    value_len: impl Fn(&T) -> usize,
    node: impl Fn(Vec<(Vec<u8>, T)>) -> Node,
    out: &mut NewNodes,
) -> Vec<(Vec<u8>, Id)> {
    if entries.is_empty() {
        return Vec::new();
    }
    let total: usize = entries
        .iter()
        .map(|(k, v)| entry_size(k, value_len(v)))
        .sum();
    let mut groups = Vec::new();
    if total <= NODE_MAX {
        groups.push(entries);
    } else {
        let mut cur = Vec::new();
        let mut size = 0;
        for e in entries {
            size += entry_size(&e.0, value_len(&e.1));
            cur.push(e);
            if size >= NODE_TARGET {
                groups.push(std::mem::take(&mut cur));
                size = 0;
            }
        }
        if !cur.is_empty() {
            groups.push(cur);
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let first = g[0].0.clone();
            let (id, bytes) = encode_node(&node(g));
            out.push((id, bytes));
            (first, id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::decode_node;
    use parking_lot::Mutex;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default)]
    struct Mem(Mutex<HashMap<Id, Vec<u8>>>);
    impl NodeSource for Mem {
        fn node(&self, id: &Id) -> Result<Arc<Node>> {
            let m = self.0.lock();
            Ok(Arc::new(decode_node(id, &m[id])?))
        }
    }

    fn run(ops: Vec<Vec<(u32, Option<u32>)>>) {
        let mem = Mem::default();
        let (e, b) = empty();
        mem.0.lock().insert(e, b);
        let mut root = e;
        let mut model = BTreeMap::new();
        let mut before: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for batch in ops {
            let mut muts: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            for (k, v) in batch {
                let key = format!("key-{k:08}").into_bytes();
                let val = v.map(|v| vec![v as u8; (v % 300) as usize]);
                match &val {
                    Some(v) => model.insert(key.clone(), v.clone()),
                    None => model.remove(&key),
                };
                muts.insert(key, val);
            }
            let muts: Vec<Mutation> = muts.into_iter().collect();
            let (r, nodes) = apply(&mem, &root, &muts).unwrap();
            mem.0.lock().extend(nodes);
            // What changed between two roots is what the batch changed.
            let mut expect: Vec<Vec<u8>> = muts
                .iter()
                .filter(|(k, v)| before.get(k) != v.as_ref())
                .map(|(k, _)| k.clone())
                .collect();
            expect.sort();
            assert_eq!(changed_keys(&mem, &root, &r).unwrap(), expect);
            assert_eq!(changed_keys(&mem, &r, &root).unwrap(), expect);
            before = model.clone();
            root = r;
            let mut c = Cursor::seek(&mem, &root, b"").unwrap();
            let mut got = BTreeMap::new();
            while let Some((k, v)) = c.next().unwrap() {
                got.insert(k, v);
            }
            assert_eq!(got, model);
            for (k, v) in model.iter().take(50) {
                assert_eq!(get(&mem, &root, k).unwrap().as_ref(), Some(v));
            }
        }
        // A seek lands on the first key >= start.
        if let Some((k, _)) = model.iter().nth(model.len() / 2) {
            let mut c = Cursor::seek(&mem, &root, k).unwrap();
            assert_eq!(c.next().unwrap().map(|e| e.0).as_ref(), Some(k));
        }
    }

    #[test]
    fn big_batches_split_and_shrink() {
        let ins: Vec<_> = (0..20_000).map(|k| (k, Some(k))).collect();
        let del: Vec<_> = (0..20_000)
            .filter(|k| k % 3 != 0)
            .map(|k| (k, None))
            .collect();
        let all: Vec<_> = (0..20_000).map(|k| (k, None)).collect();
        run(vec![ins, del, all, vec![(5, Some(5))]]);
    }

    /// Counts the nodes read.
    struct Counting<'a>(&'a Mem, std::sync::atomic::AtomicUsize);
    impl NodeSource for Counting<'_> {
        fn node(&self, id: &Id) -> Result<Arc<Node>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.node(id)
        }
    }

    #[test]
    fn changed_keys_reads_only_the_paths_to_the_changes() {
        let mem = Mem::default();
        let (e, b) = empty();
        mem.0.lock().insert(e, b);
        let key = |k: u32| format!("key-{k:08}").into_bytes();
        let all: Vec<Mutation> = (0..50_000).map(|k| (key(k), Some(vec![7; 40]))).collect();
        let (big, nodes) = apply(&mem, &e, &all).unwrap();
        mem.0.lock().extend(nodes);
        let one = vec![(key(31_337), Some(vec![8; 40]))];
        let (changed, nodes) = apply(&mem, &big, &one).unwrap();
        let total = nodes.len();
        mem.0.lock().extend(nodes);
        let count = Counting(&mem, Default::default());
        assert_eq!(
            changed_keys(&count, &big, &changed).unwrap(),
            vec![key(31_337)]
        );
        // The height probe (leftmost paths) and the changed path, of both
        // trees: 4 x depth, against the ~1,000 nodes of each tree.
        let reads = count.1.into_inner();
        assert!(reads <= 4 * total, "{reads} nodes read, depth {total}");
    }

    proptest::proptest! {
        #[test]
        fn matches_btreemap(ops in proptest::collection::vec(
            proptest::collection::vec((0u32..3000, proptest::option::of(0u32..1000)), 0..400), 1..8)) {
            run(ops);
        }
    }
}
