//! Reading and writing a branch's working state: the overlay in the `work`
//! column family (keys `branch id:8 || tree key`, values `0` = deleted or
//! `1 || value`) on top of the base snapshot tree.

use crate::db::{prefix_end, Db, CF_WORK};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::patch::{is_patched, Patched};
use crate::tree::{self, Cursor};
use rocksdb::WriteBatch;
use std::collections::BTreeMap;

/// Callback of [`View::scan`]: gets (key, value), returns false to stop.
pub type ScanFn<'f> = dyn FnMut(&[u8], &[u8]) -> Result<bool> + 'f;
/// Callback of `View::scan_overlay`: (key, Some(value) or None = deleted),
/// returns false to stop.
pub(crate) type OverlayFn<'f> = dyn FnMut(&[u8], Option<&[u8]>) -> Result<bool> + 'f;
/// Callback of [`View::for_each_change`]: (key, Some(value) or None = deleted).
pub type ChangeFn<'f> = dyn FnMut(&[u8], Option<&[u8]>) -> Result<()> + 'f;

const TOMBSTONE: u8 = 0;
const VALUE: u8 = 1;

/// Prefix of a branch's overlay keys.
pub fn overlay_prefix(bid: u64) -> [u8; 8] {
    bid.to_be_bytes()
}

fn overlay_key(bid: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&bid.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// An overlay entry holding `value`.
fn overlay_value(value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(value.len() + 1);
    v.push(VALUE);
    v.extend_from_slice(value);
    v
}

/// A branch's working state: overlay `bid` over the tree at `root`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub db: &'a Db,
    pub bid: u64,
    pub root: Id,
}

impl<'a> View<'a> {
    /// The value of a tree key in the working state.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let ov = self
            .db
            .db
            .get_pinned_cf(self.db.cf(CF_WORK), overlay_key(self.bid, key))
            .map_err(Error::db("reading the working state"))?;
        match ov.as_deref() {
            Some([TOMBSTONE, ..]) => Ok(None),
            Some([VALUE, v @ ..]) => Ok(Some(v.to_vec())),
            Some(_) => Err(Error::Corrupt("malformed working-state entry".into())),
            None => tree::get(self.db, &self.root, key),
        }
    }

    /// Calls `f` with each live (key, value) in `[start, end)`, in key order,
    /// until it returns false.
    pub fn scan(&self, start: &[u8], end: &[u8], f: &mut ScanFn) -> Result<()> {
        let ostart = overlay_key(self.bid, start);
        let oend = overlay_key(self.bid, end);
        let mut oit = self.db.iter_until(CF_WORK, Some(oend));
        oit.seek(&ostart);
        let mut next_ov = || -> Result<Option<(Vec<u8>, Vec<u8>)>> {
            let entry = match (oit.key(), oit.value()) {
                (Some(k), Some(v)) => (k[8..].to_vec(), v.to_vec()),
                _ => {
                    oit.status()
                        .map_err(Error::db("scanning the working state"))?;
                    return Ok(None);
                }
            };
            oit.next();
            Ok(Some(entry))
        };
        let mut cur = Cursor::seek(self.db, &self.root, start)?;
        let next_base = |cur: &mut Cursor| -> Result<Option<(Vec<u8>, Vec<u8>)>> {
            match cur.next()? {
                Some((k, v)) if k.as_slice() < end => Ok(Some((k, v))),
                _ => Ok(None),
            }
        };
        let mut ov = next_ov()?;
        let mut base = next_base(&mut cur)?;
        loop {
            let (key, val) = match (&ov, &base) {
                (None, None) => return Ok(()),
                (Some((ok, _)), Some((bk, _))) if ok <= bk => {
                    let same = ok == bk;
                    let (k, v) = ov.take().unwrap_or_default();
                    ov = next_ov()?;
                    if same {
                        base = next_base(&mut cur)?;
                    }
                    match v.split_first() {
                        Some((&VALUE, rest)) => (k, rest.to_vec()),
                        _ => continue,
                    }
                }
                (Some(_), None) => {
                    let (k, v) = ov.take().unwrap_or_default();
                    ov = next_ov()?;
                    match v.split_first() {
                        Some((&VALUE, rest)) => (k, rest.to_vec()),
                        _ => continue,
                    }
                }
                _ => {
                    let e = base.take().unwrap_or_default();
                    base = next_base(&mut cur)?;
                    e
                }
            };
            if !f(&key, &val)? {
                return Ok(());
            }
        }
    }

    /// Calls `f` with overlay entries (key, Some(value) or None for a
    /// deletion), in key order, until it returns false.
    pub(crate) fn scan_overlay(&self, f: &mut OverlayFn) -> Result<()> {
        let prefix = overlay_prefix(self.bid);
        let mut it = self.db.iter_until(CF_WORK, prefix_end(&prefix));
        it.seek(prefix);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !k.starts_with(&prefix) {
                break;
            }
            let value = match v.split_first() {
                Some((&VALUE, rest)) => Some(rest),
                _ => None,
            };
            if !f(&k[8..], value)? {
                break;
            }
            it.next();
        }
        it.status().map_err(Error::db("scanning the working state"))
    }

    /// Calls `f` with every overlay entry (key, Some(value) or None for a
    /// deletion), in key order: the changes since the base snapshot.
    pub fn for_each_change(&self, f: &mut ChangeFn) -> Result<()> {
        self.scan_overlay(&mut |k, v| f(k, v).map(|()| true))
    }

    /// True when the overlay has any entry.
    pub fn has_changes(&self) -> Result<bool> {
        let mut found = false;
        self.scan_overlay(&mut |_, _| {
            found = true;
            Ok(false)
        })?;
        Ok(found)
    }
}

/// Name of the merge operator of the `work` column family (stored in
/// RocksDB's OPTIONS file; a store is opened with the same one).
pub const MERGE_OPERATOR: &str = "dm-patches-v1";

/// The `work` column family's merge operator: an fsync that adds patches
/// to a block already stored as patches on the same base writes only the
/// new ones, as a merge operand (see [`Tx::merge`]). Each operand is an
/// overlay value holding a [`Patched`]; it is written over the value
/// before it when that value is patches on the same base, and replaces it
/// otherwise (a tombstone, or a chunk, which then is its base). `None`
/// (RocksDB reports corruption) for a malformed operand or existing value.
pub fn merge_patches(
    key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let patched = |v: &[u8]| Patched::parse(v, crate::store::MAX_BLOCK_SIZE).ok();
    let (mut acc, mut chunk) = match existing {
        Some([VALUE, v @ ..]) if is_patched(v) => (Some(patched(v)?), None),
        Some([VALUE, v @ ..]) => (None, crate::keys::parse_block_value(v).map(|(id, _)| id)),
        Some([TOMBSTONE]) | None => (None, None),
        Some(_) => return None,
    };
    for op in operands {
        let p = match op {
            [VALUE, v @ ..] => patched(v)?,
            _ => return None,
        };
        // A chunk value under patches on another base means a writer's
        // view of the block was stale (see `Origin::merge` in branch.rs):
        // said loudly, as it would undo the patches before.
        if let Some(chunk) = chunk.take() {
            let base = p.base.map(|(b, _)| b);
            if base != Some(chunk) {
                tracing::error!(
                    "working-state key {}: patches on base {base:?} merged onto chunk {chunk:?}",
                    hex::encode(key)
                );
            }
        }
        acc = Some(match acc {
            Some(a) if a.base == p.base => a.overlaid(&p),
            _ => p,
        });
    }
    let mut out = vec![VALUE];
    out.extend_from_slice(&acc?.encode());
    Some(out)
}

/// Operands are not combined without the value they apply to (RocksDB
/// then keeps them as they are).
pub fn merge_patches_partial(
    _key: &[u8],
    _existing: Option<&[u8]>,
    _operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    None
}

/// Adds "delete the whole overlay of `bid`" to a batch.
pub fn clear_overlay(db: &Db, batch: &mut WriteBatch, bid: u64) {
    let start = overlay_prefix(bid);
    let end = (bid + 1).to_be_bytes();
    batch.delete_range_cf(db.cf(CF_WORK), start, end);
}

/// A set of working-state changes read back by later gets of the same
/// operation, written as one atomic batch.
pub struct Tx<'a> {
    pub view: View<'a>,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Patches added to blocks already stored as patches ([`Tx::merge`]).
    merges: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<'a> Tx<'a> {
    pub fn new(view: View<'a>) -> Tx<'a> {
        Tx {
            view,
            pending: BTreeMap::new(),
            merges: Vec::new(),
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.view.get(key),
        }
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }

    /// Writes the patches `value` (an encoded [`Patched`]) over the block
    /// value at `key`, which must be patches on the same base (see
    /// [`merge_patches`]). Not seen by this transaction's `get`; a key is
    /// either put or merged in one transaction, not both.
    pub fn merge(&mut self, key: Vec<u8>, value: Vec<u8>) {
        debug_assert!(!self.pending.contains_key(&key));
        self.merges.push((key, value));
    }

    /// The batch holding this transaction's writes.
    pub fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::default();
        self.write_into(&mut batch);
        batch
    }

    pub fn write_into(self, batch: &mut WriteBatch) {
        let cf = self.view.db.cf(CF_WORK);
        for (k, v) in self.pending {
            let key = overlay_key(self.view.bid, &k);
            match v {
                Some(v) => batch.put_cf(cf, key, overlay_value(&v)),
                None => batch.put_cf(cf, key, [TOMBSTONE]),
            }
        }
        for (k, v) in self.merges {
            batch.merge_cf(cf, overlay_key(self.view.bid, &k), overlay_value(&v));
        }
    }

    /// Writes the transaction (durably when `sync`).
    pub fn commit(self, sync: bool, what: &str) -> Result<()> {
        let db = self.view.db;
        db.write(self.into_batch(), sync, what)
    }
}
