//! Which chunks of a transfer need a has-query at all. A new tree leaf
//! usually differs from its counterpart in the parent snapshot by a few
//! blocks; every block whose value is the same at the same key in a parent
//! snapshot names a chunk the receiver has (it has that parent, by the
//! receiver's invariant, or receives it in the same transfer). Only the
//! others are asked about, so a small change to a large dot costs a
//! has-query of a few ids, not of every block of the touched leaves.

use crate::error::Result;
use dm_store::object::{decode_node, Node};
use dm_store::{keys, Id};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Reads tree nodes by id (stored form).
pub type ReadFn<'a> = dyn FnMut(&Id) -> Result<Option<Vec<u8>>> + 'a;

/// Looks keys up in snapshot trees, caching decoded nodes.
struct Reader<'a, 'f> {
    read: &'a mut ReadFn<'f>,
    cache: HashMap<Id, Arc<Node>>,
}

impl Reader<'_, '_> {
    fn node(&mut self, id: &Id) -> Result<Option<Arc<Node>>> {
        if let Some(n) = self.cache.get(id) {
            return Ok(Some(n.clone()));
        }
        let Some(bytes) = (self.read)(id)? else {
            return Ok(None);
        };
        let n = Arc::new(decode_node(id, &bytes)?);
        self.cache.insert(*id, n.clone());
        Ok(Some(n))
    }

    /// The value at `key` in the tree at `root` (None also when a node is
    /// not readable: then nothing is skipped).
    fn get(&mut self, root: &Id, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut id = *root;
        loop {
            let Some(node) = self.node(&id)? else {
                return Ok(None);
            };
            match &*node {
                Node::Leaf(entries) => {
                    return Ok(entries
                        .binary_search_by(|(k, _)| k.as_slice().cmp(key))
                        .ok()
                        .map(|i| entries[i].1.clone()))
                }
                Node::Inner(children) => {
                    if children.is_empty() {
                        return Ok(None);
                    }
                    let n = children.partition_point(|(k, _)| k.as_slice() <= key);
                    id = children[n.saturating_sub(1)].1;
                }
            }
        }
    }
}

/// The chunks named by the leaves among `new_nodes` whose block entries do
/// not appear unchanged in any of the `bases` (parent snapshot roots),
/// each with the length of data it holds (its block's valid length, for
/// progress: a chunk of a 2 KiB file is no whole block). `read` returns
/// the stored form of a node (new or base).
pub fn chunks_to_check(
    new_nodes: &[Id],
    bases: &[Id],
    read: &mut ReadFn<'_>,
) -> Result<Vec<(Id, u32)>> {
    let mut r = Reader {
        read,
        cache: HashMap::new(),
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for id in new_nodes {
        let Some(node) = r.node(id)? else { continue };
        let Node::Leaf(entries) = &*node else {
            continue;
        };
        for (k, v) in entries {
            if !matches!(keys::parse(k), Some((_, keys::TAG_BLOCK))) {
                continue;
            }
            let Some((cid, len)) = keys::parse_block_value(v) else {
                continue;
            };
            if seen.contains(&cid) {
                continue;
            }
            let mut known = false;
            for b in bases {
                if r.get(b, k)?.as_deref() == Some(v.as_slice()) {
                    known = true;
                    break;
                }
            }
            if !known {
                seen.insert(cid);
                out.push((cid, len));
            }
        }
    }
    Ok(out)
}
