//! What a peer can make this process allocate: the counts a peer sends (`all_to_all_v_alloc`,
//! `all_gather_alloc`) and the messages it sends before their receive is posted are checked
//! against one limit before anything is allocated.
use crate::error::{Error, Result};

/// Bytes a peer can make this process allocate at once: `EMBER_MAX_ALLOC_BYTES` (1 to
/// `isize::MAX`), else half of the machine's physical memory (at least 1 GiB). Read once; a
/// malformed, zero or out-of-range value is an error naming the variable, from this call and
/// every later one (every fabric checks it when it is built).
pub fn alloc_limit() -> Result<usize> {
    static V: std::sync::OnceLock<Result<usize>> = std::sync::OnceLock::new();
    V.get_or_init(|| alloc_limit_from(std::env::var_os("EMBER_MAX_ALLOC_BYTES"))).clone()
}

/// [`alloc_limit`] for the value `v` of `EMBER_MAX_ALLOC_BYTES` (`None`: unset).
fn alloc_limit_from(v: Option<std::ffi::OsString>) -> Result<usize> {
    if v.is_some() {
        return crate::env::number("EMBER_MAX_ALLOC_BYTES", v, 0, 1..=isize::MAX as u64, "bytes").map(|b| b as usize);
    }
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    let phys = (pages.max(0) as usize).saturating_mul(page.max(0) as usize);
    Ok((phys / 2).max(1 << 30))
}

/// The sum of `counts`, `None` when it overflows: every sum of counts, the caller's or a peer's,
/// is taken by this one function.
pub(crate) fn checked_sum(counts: &[usize]) -> Option<usize> {
    counts.iter().try_fold(0usize, |a, &c| a.checked_add(c))
}

/// The number of elements of `elem` bytes that `counts` (from the peers, `members[i]` being
/// the world rank that sent `counts[i]`) add up to: a protocol error naming the peer with the
/// largest count when the sum overflows or its bytes exceed [`alloc_limit`].
pub(crate) fn peer_total(op: &'static str, counts: &[usize], elem: usize, members: &[usize]) -> Result<usize> {
    let limit = alloc_limit()?;
    let total = checked_sum(counts);
    let bytes = total.and_then(|t| t.checked_mul(elem.max(1)));
    match (total, bytes) {
        (Some(t), Some(b)) if b <= limit => Ok(t),
        _ => {
            let (i, &c) = counts.iter().enumerate().max_by_key(|&(_, c)| *c).unwrap_or((0, &0));
            Err(Error::Protocol {
                op,
                peer: members.get(i).copied().unwrap_or(i),
                detail: format!(
                    "counts from the peers add up to more than the {limit} bytes a peer may make this rank allocate (this one sent {c}; EMBER_MAX_ALLOC_BYTES)"
                ),
            })
        }
    }
}

/// A caller's own element count turned into an allocation: a usage error when it overflows or
/// exceeds what a `Vec` can hold.
pub(crate) fn own_total(op: &'static str, counts: &[usize], elem: usize) -> Result<usize> {
    match checked_sum(counts).and_then(|t| t.checked_mul(elem.max(1)).map(|b| (t, b))) {
        Some((t, b)) if b <= isize::MAX as usize => Ok(t),
        _ => Err(Error::usage(op, format!("{} counts of {elem}-byte elements overflow", counts.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allocation_limit_variable_is_checked() {
        let at = |v: &str| alloc_limit_from(Some(v.into()));
        assert_eq!(at("1").unwrap(), 1);
        assert_eq!(at("1048576").unwrap(), 1 << 20);
        assert_eq!(at(&(isize::MAX as u64).to_string()).unwrap(), isize::MAX as usize);
        // Unset: half the physical memory, at least 1 GiB.
        assert!(alloc_limit_from(None).unwrap() >= 1 << 30);
        for bad in ["0", "4k", "1G", "-1", "abc", "", "9223372036854775808"] {
            let e = at(bad).unwrap_err().to_string();
            assert!(e.contains("EMBER_MAX_ALLOC_BYTES") && e.contains(&format!("bytes from 1 to {}", isize::MAX)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn sums_of_counts_are_checked() {
        assert_eq!(checked_sum(&[]), Some(0));
        assert_eq!(checked_sum(&[3, 4, usize::MAX - 7]), Some(usize::MAX));
        assert_eq!(checked_sum(&[3, 4, usize::MAX - 6]), None);
    }
}
