//! In-process backend: ranks are threads of one process. `send` waits until the receiver has
//! posted its buffer and copies straight into it (one copy); small messages sent early are
//! stashed (eager) so that latency-bound exchanges do not wait.
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use crate::mailbox::{Dir, Mailbox};
use std::sync::Arc;

/// Messages up to this size are stashed when the receiver has not posted yet.
const EAGER_MAX: usize = 8 << 10;

pub(crate) struct LocalWorld {
    boxes: Vec<Mailbox>,
}

pub(crate) struct LocalFabric {
    world: Arc<LocalWorld>,
    rank: usize,
}

pub(crate) fn world(n: usize) -> Vec<LocalFabric> {
    let world = Arc::new(LocalWorld { boxes: (0..n).map(|_| Mailbox::new()).collect() });
    (0..n).map(|rank| LocalFabric { world: world.clone(), rank }).collect()
}

fn no_poll() -> Result<bool> {
    Ok(false)
}

impl Drop for LocalFabric {
    /// A rank that goes away (returns, or panics) fails every wait on it at once.
    fn drop(&mut self) {
        let why = if std::thread::panicking() { "its thread panicked" } else { "its communicator was dropped" };
        // Including our own box: senders to us wait on it.
        for b in &self.world.boxes {
            b.peer_died(self.rank, why.into());
        }
    }
}

impl Fabric for LocalFabric {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.world.boxes.len()
    }
    fn name(&self) -> &'static str {
        "local"
    }

    unsafe fn post_recv(&self, src: usize, tag: Tag, buf: *mut u8, len: usize, w: &Wait) -> Result<()> {
        self.world.boxes[self.rank].post(src, tag, buf, len, w.op)?;
        Ok(())
    }

    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        let me = self.rank;
        let mb = &self.world.boxes[dst];
        // Rendezvous: wait for the posted buffer (or stash a small message).
        let target = mb.wait_until(dst, w, &no_poll, |t| {
            if t.dead.contains_key(&dst) {
                return None; // wait_until reports it
            }
            match Mailbox::claim(t, me, tag, len, w.op) {
                Ok(Some(buf)) => Some(Ok(Some(buf))),
                Ok(None) if len <= EAGER_MAX => {
                    // SAFETY: data..data+len is readable (Fabric::send contract).
                    let v = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
                    Some(Mailbox::deliver_locked(t, me, tag, v, false, w.op).map(|_| None))
                }
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            }
        });
        match target {
            Ok(Some(buf)) => {
                // SAFETY: claim checked len <= the posted capacity; the receiver keeps the buffer
                // alive until the slot leaves `Writing` (cancel waits for it); `data` holds `len`
                // readable bytes (the `send` contract) and is not the receiver's buffer.
                unsafe { std::ptr::copy_nonoverlapping(data, buf.0, len) };
                mb.complete(me, tag, Dir::Recv, len);
                Ok(())
            }
            Ok(None) => {
                mb.notify();
                Ok(())
            }
            Err(Error::Protocol { detail, .. }) => {
                // Report it against ourselves on the sender side too.
                Err(Error::Protocol { op: w.op, peer: dst, detail })
            }
            Err(e) => Err(e),
        }
    }

    fn wait_send(&self, _dst: usize, _tag: Tag, _w: &Wait) -> Result<()> {
        Ok(()) // `send` copies synchronously
    }

    fn wait_recv(&self, src: usize, tag: Tag, w: &Wait) -> Result<usize> {
        self.world.boxes[self.rank].wait_done(src, tag, Dir::Recv, w, &no_poll)
    }

    fn cancel_recv(&self, src: usize, tag: Tag) {
        self.world.boxes[self.rank].cancel(src, tag)
    }

    fn cancel_send(&self, _dst: usize, _tag: Tag) {
        // `send` copied synchronously (or stashed a copy): the buffer is not read any more.
    }
}

