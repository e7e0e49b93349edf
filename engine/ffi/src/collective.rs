//! The protocol of collective calls on a rank: the ranks agree that every rank accepted its
//! arguments before any state changes (`EMBER_STATUS_ERR_PEER` otherwise), and a transport
//! failure midway marks the rank unusable.

use crate::handle::Ranked;
use crate::status::{ember_status_name, fail, EmberStatus, Failure, R};
use ember_transport::Comm;
use std::ffi::CStr;

/// Every rank's verdict on its own arguments (collective over `world`): this rank's own
/// failure, else `ErrPeer` naming the first rank that failed, else `mine`.
pub(crate) fn agree<T>(world: &Comm, mine: R<T>) -> R<T> {
    let code = match &mine {
        Ok(_) => 0u32,
        Err(Failure(s, _)) => *s as u32,
    };
    let mut all = vec![0u32; world.size()];
    world.all_gather(&[code], &mut all)?;
    let mine = mine?;
    if let Some((k, &c)) = all.iter().enumerate().find(|(_, &c)| c != 0) {
        // SAFETY: `ember_status_name` returns a pointer to a static NUL-terminated string for
        // every value (never NULL).
        let name = unsafe { CStr::from_ptr(ember_status_name(c as i32)) }.to_string_lossy().into_owned();
        return fail(EmberStatus::ErrPeer, format!("rank {k} rejected its part of this collective call ({name}; its own call returned the reason); no rank changed its state"));
    }
    Ok(mine)
}

/// Run a collective step of a rank: a transport failure midway marks the rank unusable.
pub(crate) fn on_rank<T>(r: &mut Ranked, f: impl FnOnce(&mut Ranked) -> R<T>) -> R<T> {
    let out = f(r);
    if let Err(Failure(EmberStatus::ErrInternal, m)) = &out {
        if m.starts_with("transport") {
            r.broken = Some(m.clone());
        }
    }
    out
}
