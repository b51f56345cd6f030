//! Hashing, encoding and storing of whole written blocks ahead of their
//! flush, on a worker thread: a sequential writer's next request is
//! received while the blocks of its last one are hashed (blake3),
//! compressed (zstd), checksummed (crc32c) and appended to the chunk log
//! (unsynced and unindexed, as a spill: see [`Db::spill_prepared`]). The
//! flush then only syncs and indexes them.
//!
//! A [`Slot`] belongs to one buffered block. Whoever needs the result first
//! wins: the flush takes a slot the worker has not started and does the
//! work itself, so a slow worker never delays a flush.

use crate::chunk;
use crate::chunklog;
use crate::db::Db;
use crate::id::Id;
use parking_lot::{Condvar, Mutex, RwLock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock, Weak};

/// Held (shared) by each worker while it runs or drops a slot, so that a
/// store being closed can wait until no worker holds a reference to it (see
/// [`close`]).
static RUNNING: RwLock<()> = RwLock::new(());

/// Worker threads. Two: with one, a sequential writer on 2 cores waited
/// for it (it hashes, compresses, checksums and appends every block).
const WORKERS: usize = 2;

/// A block ready to be stored: its id and stored form.
pub(crate) struct Prepared {
    pub id: Id,
    pub codec: u8,
    /// The zstd payload; `None` when raw (the payload is the block itself).
    pub zstd: Option<Vec<u8>>,
    /// CRC of the log record, when the chunk goes to the log.
    pub crc: Option<u32>,
}

impl Prepared {
    pub fn of(data: &[u8]) -> Prepared {
        let id = Id::of(data);
        let (codec, payload) = chunk::encode_parts(data);
        let crc = (payload.len() >= chunklog::INLINE_MAX)
            .then(|| chunklog::record_crc(&id, codec, &payload));
        let zstd = match payload {
            std::borrow::Cow::Owned(z) => Some(z),
            std::borrow::Cow::Borrowed(_) => None,
        };
        Prepared {
            id,
            codec,
            zstd,
            crc,
        }
    }

    /// The stored form's payload, given the block's bytes.
    pub fn payload<'a>(&'a self, data: &'a [u8]) -> &'a [u8] {
        self.zstd.as_deref().unwrap_or(data)
    }
}

enum State {
    Queued(Arc<Vec<u8>>),
    Running,
    Done(Prepared),
    Taken,
}

/// The pending preparation of one block.
pub(crate) struct Slot {
    state: Mutex<State>,
    done: Condvar,
    /// Where the worker stores the prepared block. Weak: a queued slot
    /// never keeps a closed store open.
    db: Weak<Db>,
    /// Set when the store closes: the worker then leaves its slots alone.
    closed: Arc<AtomicBool>,
    /// The chunk the worker stored, pinned against GC until the slot is
    /// dropped (by then a flush or spill holds it, or it is garbage).
    stored: Mutex<Option<Id>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(id) = self.stored.get_mut().take() {
            if !self.closed.load(Ordering::Acquire) {
                if let Some(db) = self.db.upgrade() {
                    db.unpin([&id]);
                }
            }
        }
    }
}

impl Slot {
    /// Worker side: prepares and stores the block unless a flush took it
    /// first. A failed append is left to the flush, which appends again
    /// and reports the error.
    fn run(&self) {
        let data = {
            let mut st = self.state.lock();
            match std::mem::replace(&mut *st, State::Running) {
                State::Queued(d) => d,
                other => {
                    *st = other;
                    return;
                }
            }
        };
        let p = Prepared::of(&data);
        let db = match self.closed.load(Ordering::Acquire) {
            false => self.db.upgrade(),
            true => None,
        };
        let stored = db.and_then(|db| {
            let _barrier = db.gc_barrier.read_recursive();
            db.spill_prepared(&p, &data).ok()
        });
        *self.stored.lock() = stored;
        *self.state.lock() = State::Done(p);
        self.done.notify_all();
    }

    /// The prepared block if the worker has finished it; `None` (the slot
    /// left as it is) otherwise.
    pub fn try_take(&self) -> Option<Prepared> {
        let mut st = self.state.lock();
        match std::mem::replace(&mut *st, State::Taken) {
            State::Done(p) => Some(p),
            other => {
                *st = other;
                None
            }
        }
    }

    /// The prepared block; prepares `data` (the same bytes) here when the
    /// worker has not started on it.
    pub fn take(&self, data: &[u8]) -> Prepared {
        let mut st = self.state.lock();
        loop {
            match std::mem::replace(&mut *st, State::Taken) {
                State::Done(p) => return p,
                State::Running => {
                    *st = State::Running;
                    self.done.wait(&mut st);
                }
                State::Queued(_) | State::Taken => {
                    drop(st);
                    return Prepared::of(data);
                }
            }
        }
    }
}

fn worker() -> Option<&'static Mutex<mpsc::Sender<Arc<Slot>>>> {
    static WORKER: OnceLock<Option<Mutex<mpsc::Sender<Arc<Slot>>>>> = OnceLock::new();
    WORKER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Arc<Slot>>();
            let rx = Arc::new(Mutex::new(rx));
            let started = (0..WORKERS)
                .filter(|i| {
                    let rx = rx.clone();
                    std::thread::Builder::new()
                        .name(format!("dm-stage-{i}"))
                        .spawn(move || loop {
                            let Ok(slot) = rx.lock().recv() else {
                                return;
                            };
                            let _running = RUNNING.read();
                            // Nobody else holds it: the block was dropped or flushed.
                            if Arc::strong_count(&slot) > 1 {
                                slot.run();
                            }
                            drop(slot);
                        })
                        .is_ok()
                })
                .count();
            (started > 0).then(|| Mutex::new(tx))
        })
        .as_ref()
}

/// Queues a whole block for preparation and storing in `db`. Without a
/// worker (it could not be started) the slot stays queued and the flush
/// prepares it.
pub(crate) fn submit(db: &Arc<Db>, data: Arc<Vec<u8>>) -> Arc<Slot> {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Queued(data)),
        done: Condvar::new(),
        db: Arc::downgrade(db),
        closed: db.stage_closed.clone(),
        stored: Mutex::new(None),
    });
    if let Some(w) = worker() {
        let _ = w.lock().send(slot.clone());
    }
    slot
}

/// Stops the worker from using `db` (set as its store closes) and waits
/// until it holds no reference to it, so that the store is closed when the
/// caller's last reference goes (a reopen right after then finds it
/// unlocked).
pub(crate) fn close(db: &Db) {
    db.stage_closed.store(true, Ordering::Release);
    drop(RUNNING.write());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_gives_the_same_result_whoever_prepares_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), Default::default()).unwrap());
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 31 % 256) as u8).collect();
        let direct = Prepared::of(&data);
        let slot = submit(&db, Arc::new(data.clone()));
        let p = slot.take(&data);
        assert_eq!(p.id, direct.id);
        assert_eq!(p.codec, direct.codec);
        assert_eq!(p.payload(&data), direct.payload(&data));
        assert_eq!(p.crc, direct.crc);
        // Stored by the worker (unless the take came first), and pinned
        // while the slot lives.
        if slot.stored.lock().is_some() {
            assert_eq!(*db.read_chunk(&p.id).unwrap(), data);
            assert_eq!(db.pins.lock().get(&p.id), Some(&1));
        }
        // The worker lets go of its reference just after finishing.
        for _ in 0..5000 {
            if Arc::strong_count(&slot) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(slot);
        assert!(db.pins.lock().is_empty(), "unpinned with the slot");
        // Taken before the worker ran: prepared by the caller, not stored.
        let other: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Queued(Arc::new(other.clone()))),
            done: Condvar::new(),
            db: Arc::downgrade(&db),
            closed: db.stage_closed.clone(),
            stored: Mutex::new(None),
        });
        assert_eq!(slot.take(&other).id, Id::of(&other));
        slot.run(); // a late worker finds nothing to do
        assert!(slot.stored.lock().is_none());
        assert_eq!(db.chunk_len(&Id::of(&other)).unwrap(), None);
    }
}
