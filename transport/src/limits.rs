//! What a peer can make this process allocate: the counts a peer sends (`all_to_all_v_alloc`,
//! `all_gather_alloc`) and the messages it sends before their receive is posted are checked
//! against one limit before anything is allocated.
use crate::error::{Error, Result};

/// Bytes a peer can make this process allocate at once: `EMBER_MAX_ALLOC_BYTES`, else half of
/// the machine's physical memory (at least 1 GiB). Read once.
pub fn alloc_limit() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        if let Some(v) = std::env::var("EMBER_MAX_ALLOC_BYTES").ok().and_then(|s| s.trim().parse().ok()) {
            return v;
        }
        // SAFETY: sysconf has no preconditions.
        let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        let phys = (pages.max(0) as usize).saturating_mul(page.max(0) as usize);
        (phys / 2).max(1 << 30)
    })
}

/// The number of elements of `elem` bytes that `counts` (from the peers, `members[i]` being
/// the world rank that sent `counts[i]`) add up to: a protocol error naming the peer with the
/// largest count when the sum overflows or its bytes exceed [`alloc_limit`].
pub(crate) fn peer_total(op: &'static str, counts: &[usize], elem: usize, members: &[usize]) -> Result<usize> {
    let total = counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
    let bytes = total.and_then(|t| t.checked_mul(elem.max(1)));
    match (total, bytes) {
        (Some(t), Some(b)) if b <= alloc_limit() => Ok(t),
        _ => {
            let (i, &c) = counts.iter().enumerate().max_by_key(|&(_, c)| *c).unwrap_or((0, &0));
            Err(Error::Protocol {
                op,
                peer: members.get(i).copied().unwrap_or(i),
                detail: format!(
                    "counts from the peers add up to more than the {} bytes a peer may make this rank allocate (this one sent {c}; EMBER_MAX_ALLOC_BYTES)",
                    alloc_limit()
                ),
            })
        }
    }
}

/// A caller's own element count turned into an allocation: a usage error when it overflows or
/// exceeds what a `Vec` can hold.
pub(crate) fn own_total(op: &'static str, counts: &[usize], elem: usize) -> Result<usize> {
    let total = counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
    match total.and_then(|t| t.checked_mul(elem.max(1)).map(|b| (t, b))) {
        Some((t, b)) if b <= isize::MAX as usize => Ok(t),
        _ => Err(Error::usage(op, format!("{} counts of {elem}-byte elements overflow", counts.len()))),
    }
}
