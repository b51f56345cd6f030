//! The RocksDB layer: column families, caches, and the chunk and object
//! stores built on them. Everything above this module speaks in ids, tree
//! keys and records; only this module and the metadata key helpers in
//! `meta` know RocksDB key names.

use crate::chunk::{self, ChunkStore};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::object::{self, Node};
use crate::tree::NodeSource;
use parking_lot::Mutex;
use rocksdb::{ColumnFamily, Options, WriteBatch, WriteOptions, DB};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// Column family: dots, branches, counters.
pub const CF_META: &str = "meta";
/// Column family: content-addressed objects (tree nodes, commits).
pub const CF_OBJECTS: &str = "objects";
/// Column family: chunks (stored in RocksDB blob files).
pub const CF_CHUNKS: &str = "chunks";
/// Column family: branches' working overlays.
pub const CF_WORK: &str = "work";
/// Column family: chunk id -> stored length (u32 LE). Answers "is this
/// chunk here?" without reading the chunk's blob.
pub const CF_CHUNK_INDEX: &str = "chunk-index";

/// Tuning of an open store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bytes of decompressed chunks kept in memory.
    pub chunk_cache_bytes: u64,
    /// Decoded tree nodes kept in memory.
    pub node_cache_entries: usize,
    /// Buffered (not yet chunked) write bytes per branch before a flush is forced.
    pub write_buffer_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunk_cache_bytes: 128 << 20,
            node_cache_entries: 16 * 1024,
            write_buffer_bytes: 64 << 20,
        }
    }
}

/// Weighs cached chunks by their size.
#[derive(Clone)]
struct ByLen;
impl quick_cache::Weighter<Id, Arc<Vec<u8>>> for ByLen {
    fn weight(&self, _k: &Id, v: &Arc<Vec<u8>>) -> u64 {
        v.len() as u64 + 64
    }
}

/// The open database plus caches.
pub struct Db {
    pub(crate) db: DB,
    nodes: quick_cache::sync::Cache<Id, Arc<Node>>,
    chunks: quick_cache::sync::Cache<Id, Arc<Vec<u8>>, ByLen>,
    /// While a GC runs: every id written or re-referenced since it began,
    /// which the sweep must keep.
    pub(crate) young: Mutex<Option<HashSet<Id>>>,
    /// Held (shared) by every writer from the moment it decides a chunk is
    /// already stored until the batch that references it is written; GC
    /// takes it exclusively while it starts recording young ids. So a
    /// reference GC cannot see in its mark was always recorded as young.
    pub(crate) gc_barrier: parking_lot::RwLock<()>,
    /// Ids imported by transfers still in progress (not yet reachable from
    /// a branch): GC keeps them (see `transfer`). Id -> number of holders.
    pub(crate) pins: Mutex<std::collections::HashMap<Id, u32>>,
    pub(crate) opts: StoreOptions,
}

impl Db {
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Db> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            context: format!("creating the data directory {}", dir.display()),
            source,
        })?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(4);
        let mut chunk_opts = Options::default();
        chunk_opts.set_enable_blob_files(true);
        chunk_opts.set_min_blob_size(1024);
        chunk_opts.set_blob_file_size(256 << 20);
        chunk_opts.set_enable_blob_gc(true);
        chunk_opts.set_write_buffer_size(64 << 20);
        let cfs = vec![
            rocksdb::ColumnFamilyDescriptor::new(CF_META, Options::default()),
            rocksdb::ColumnFamilyDescriptor::new(CF_OBJECTS, Options::default()),
            rocksdb::ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_opts),
            rocksdb::ColumnFamilyDescriptor::new(CF_WORK, Options::default()),
            rocksdb::ColumnFamilyDescriptor::new(CF_CHUNK_INDEX, Options::default()),
        ];
        let path = dir.join("db");
        let db = DB::open_cf_descriptors(&db_opts, &path, cfs).map_err(Error::db(format!(
            "opening the store at {}",
            path.display()
        )))?;
        Ok(Db {
            db,
            nodes: quick_cache::sync::Cache::new(opts.node_cache_entries),
            chunks: quick_cache::sync::Cache::with_weighter(
                (opts.chunk_cache_bytes / 65536).max(16) as usize,
                opts.chunk_cache_bytes,
                ByLen,
            ),
            young: Mutex::new(None),
            gc_barrier: parking_lot::RwLock::new(()),
            pins: Mutex::new(std::collections::HashMap::new()),
            opts,
        })
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        // The four column families are created at open (create_missing_column_families).
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Writes a batch; `sync` makes it durable before returning.
    pub fn write(&self, batch: WriteBatch, sync: bool, what: &str) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(Error::db(what))
    }

    /// Makes every write so far durable.
    pub fn sync_wal(&self) -> Result<()> {
        self.db
            .flush_wal(true)
            .map_err(Error::db("syncing the write-ahead log"))
    }

    pub(crate) fn note_young(&self, id: &Id) {
        if let Some(set) = self.young.lock().as_mut() {
            set.insert(*id);
        }
    }

    // ---- objects ----

    /// Reads an object's stored bytes.
    pub fn get_object(&self, id: &Id) -> Result<Vec<u8>> {
        self.db
            .get_cf(self.cf(CF_OBJECTS), id.0)
            .map_err(Error::db(format!("reading object {}", id.short())))?
            .ok_or_else(|| Error::Corrupt(format!("object {} is missing", id.short())))
    }

    pub fn has_object(&self, id: &Id) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_OBJECTS), id.0)
            .map_err(Error::db(format!("reading object {}", id.short())))?
            .is_some())
    }

    /// Adds an object to a batch.
    pub fn put_object(&self, batch: &mut WriteBatch, id: &Id, bytes: &[u8]) {
        self.note_young(id);
        batch.put_cf(self.cf(CF_OBJECTS), id.0, bytes);
    }

    pub fn commit(&self, id: &Id) -> Result<object::Commit> {
        let bytes = self.get_object(id)?;
        object::decode(id, object::KIND_COMMIT, &bytes)
    }

    // ---- chunks ----

    /// Hashes a block's bytes and, unless the chunk is already stored, adds
    /// its compressed form to `batch`; returns its id. Hold `gc_barrier`
    /// (shared) until the batch and whatever references the id are written.
    pub fn stage_chunk(&self, batch: &mut WriteBatch, data: &[u8]) -> Result<Id> {
        let id = Id::of(data);
        self.note_young(&id);
        if self.chunks.contains_key(&id) || self.chunk_len(&id)?.is_some() {
            return Ok(id);
        }
        let stored = chunk::encode(data);
        let len = u32::try_from(stored.len())
            .map_err(|_| Error::Corrupt(format!("chunk {} is too large", id.short())))?;
        batch.put_cf(self.cf(CF_CHUNKS), id.0, &stored);
        batch.put_cf(self.cf(CF_CHUNK_INDEX), id.0, len.to_le_bytes());
        Ok(id)
    }

    /// Hashes, compresses and stores a block's bytes; returns its id.
    pub fn store_chunk(&self, data: &[u8]) -> Result<Id> {
        let id = Id::of(data);
        let mut young = self.young.lock();
        if let Some(set) = young.as_mut() {
            // GC is running: record the id and write while holding the lock,
            // so the sweep cannot delete this chunk between the two.
            set.insert(id);
            self.put_chunk_raw(&id, &chunk::encode(data))?;
            return Ok(id);
        }
        drop(young);
        if !self.chunks.contains_key(&id) {
            self.put_chunk_raw(&id, &chunk::encode(data))?;
        }
        Ok(id)
    }

    fn put_chunk_raw(&self, id: &Id, stored: &[u8]) -> Result<bool> {
        if self.chunk_len(id)?.is_some() {
            return Ok(false);
        }
        let len = u32::try_from(stored.len())
            .map_err(|_| Error::Corrupt(format!("chunk {} is too large", id.short())))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_CHUNKS), id.0, stored);
        batch.put_cf(self.cf(CF_CHUNK_INDEX), id.0, len.to_le_bytes());
        self.write(batch, false, &format!("writing chunk {}", id.short()))?;
        Ok(true)
    }

    /// The stored length of a chunk, if present (from the index: no blob read).
    pub fn chunk_len(&self, id: &Id) -> Result<Option<u64>> {
        let v = self
            .db
            .get_pinned_cf(self.cf(CF_CHUNK_INDEX), id.0)
            .map_err(Error::db(format!("checking chunk {}", id.short())))?;
        Ok(v.map(|b| {
            b.get(..4)
                .map_or(0, |l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as u64)
        }))
    }

    /// A chunk's decompressed bytes (cached).
    pub fn read_chunk(&self, id: &Id) -> Result<Arc<Vec<u8>>> {
        if let Some(c) = self.chunks.get(id) {
            return Ok(c);
        }
        let stored = self
            .get(id)?
            .ok_or_else(|| Error::Corrupt(format!("chunk {} is missing", id.short())))?;
        let data = Arc::new(chunk::decode(&stored, chunk::MAX_CHUNK)?);
        self.chunks.insert(*id, data.clone());
        Ok(data)
    }
}

impl NodeSource for Db {
    fn node(&self, id: &Id) -> Result<Arc<Node>> {
        if let Some(n) = self.nodes.get(id) {
            return Ok(n);
        }
        let bytes = self.get_object(id)?;
        let node = Arc::new(object::decode_node(id, &bytes)?);
        self.nodes.insert(*id, node.clone());
        Ok(node)
    }
}

impl ChunkStore for Db {
    fn put_if_absent(&self, id: &Id, stored: &[u8]) -> Result<bool> {
        let mut young = self.young.lock();
        if let Some(set) = young.as_mut() {
            set.insert(*id);
            return self.put_chunk_raw(id, stored);
        }
        drop(young);
        self.put_chunk_raw(id, stored)
    }

    fn get(&self, id: &Id) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf(self.cf(CF_CHUNKS), id.0)
            .map_err(Error::db(format!("reading chunk {}", id.short())))
    }

    fn has_many(&self, ids: &[Id]) -> Result<Vec<bool>> {
        let cf = self.cf(CF_CHUNK_INDEX);
        let keys: Vec<_> = ids.iter().map(|id| (cf, id.0)).collect();
        self.db
            .multi_get_cf(keys)
            .into_iter()
            .map(|r| {
                r.map(|v| v.is_some())
                    .map_err(Error::db("checking which chunks are present"))
            })
            .collect()
    }

    fn delete(&self, id: &Id) -> Result<()> {
        self.chunks.remove(id);
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_CHUNK_INDEX), id.0);
        batch.delete_cf(self.cf(CF_CHUNKS), id.0);
        self.write(batch, false, &format!("deleting chunk {}", id.short()))
    }

    fn for_each_id(&self, f: &mut dyn FnMut(Id) -> Result<()>) -> Result<()> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_CHUNK_INDEX));
        it.seek_to_first();
        while it.valid() {
            if let Some(k) = it.key() {
                f(Id::from_slice(k)?)?;
            }
            it.next();
        }
        it.status().map_err(Error::db("listing chunks"))
    }
}
