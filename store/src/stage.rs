//! Hashing and encoding of whole written blocks ahead of their flush, on a
//! worker thread: a sequential writer's next request is received while the
//! blocks of its last one are hashed (blake3), compressed (zstd) and
//! checksummed (crc32c). The flush then only appends and indexes them.
//!
//! A [`Slot`] belongs to one buffered block. Whoever needs the result first
//! wins: the flush takes a slot the worker has not started and does the
//! work itself, so a slow worker never delays a flush.

use crate::chunk;
use crate::chunklog;
use crate::id::Id;
use parking_lot::{Condvar, Mutex};
use std::sync::{mpsc, Arc, OnceLock};

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
}

impl Slot {
    /// Worker side: prepares the block unless a flush took it first.
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
        *self.state.lock() = State::Done(p);
        self.done.notify_all();
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
            std::thread::Builder::new()
                .name("dm-stage".into())
                .spawn(move || {
                    for slot in rx {
                        // Nobody else holds it: the block was dropped or flushed.
                        if Arc::strong_count(&slot) > 1 {
                            slot.run();
                        }
                    }
                })
                .ok()
                .map(|_| Mutex::new(tx))
        })
        .as_ref()
}

/// Queues a whole block for preparation. Without a worker (it could not be
/// started) the slot stays queued and the flush prepares it.
pub(crate) fn submit(data: Arc<Vec<u8>>) -> Arc<Slot> {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Queued(data)),
        done: Condvar::new(),
    });
    if let Some(w) = worker() {
        let _ = w.lock().send(slot.clone());
    }
    slot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_gives_the_same_result_whoever_prepares_it() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 31 % 256) as u8).collect();
        let direct = Prepared::of(&data);
        let slot = submit(Arc::new(data.clone()));
        let p = slot.take(&data);
        assert_eq!(p.id, direct.id);
        assert_eq!(p.codec, direct.codec);
        assert_eq!(p.payload(&data), direct.payload(&data));
        assert_eq!(p.crc, direct.crc);
        // Taken before the worker ran: prepared by the caller.
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Queued(Arc::new(data.clone()))),
            done: Condvar::new(),
        });
        assert_eq!(slot.take(&data).id, direct.id);
        slot.run(); // a late worker finds nothing to do
    }
}
