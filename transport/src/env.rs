//! The environment variables the transport reads, each parsed and checked before use: a
//! malformed or out-of-range value is an error naming the variable and what it accepts, never a
//! silent default. Read where the value is used, each with its limits:
//!
//! * `EMBER_TIMEOUT_MS` ([`crate::bootstrap::timeout_from`]): 1 ms to [`crate::MAX_TIMEOUT`];
//! * `EMBER_MAX_ALLOC_BYTES` ([`crate::alloc_limit`]): 1 byte to `isize::MAX`;
//! * `EMBER_SPIN_US`, `EMBER_TCP_SPIN_US` ([`crate::spin::max_from_env`]): 0 to 1 s;
//! * `EMBER_SHM_EAGER`, `EMBER_SHM_DIRECT`, `EMBER_SHM_COPY` (`shm::Options`, read when the
//!   shared-memory fabric is built);
//! * `EMBER_TCP_SOCKBUF`, `EMBER_TCP_CONGESTION` (read when the TCP mesh is built);
//! * `EMBER_RDMA_SLOTS`, `EMBER_RDMA_CHUNK` ([`crate::rdma::join::rdma_config_from_vars`]).
//!
//! The parsers take the value itself (`None` when unset), so tests need not touch the
//! process's environment.
use crate::error::{Error, Result};
use std::ffi::OsStr;
use std::ops::RangeInclusive;

/// `var`'s value `v` (`None`: unset, then `default`): a whole number in `range` (`unit`: what it
/// counts, for the error). Surrounding blanks are ignored; anything else (a sign, a suffix, an
/// empty value) is an error naming the variable and the range.
pub(crate) fn number(var: &str, v: Option<impl AsRef<OsStr>>, default: u64, range: RangeInclusive<u64>, unit: &str) -> Result<u64> {
    let Some(v) = v else { return Ok(default) };
    let v = v.as_ref();
    let digits = v.to_str().map(str::trim).filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    match digits.and_then(|s| s.parse::<u64>().ok()) {
        Some(n) if range.contains(&n) => Ok(n),
        _ => Err(Error::Bootstrap(format!("{var}={v:?}: not a whole number of {unit} from {} to {}", range.start(), range.end()))),
    }
}

/// `var`'s value `v` (`None`: unset, then `default`): one of `choices` (its name, compared
/// ignoring ASCII case, and the value it stands for); another is an error naming the variable
/// and the names.
pub(crate) fn choice<T: Copy>(var: &str, v: Option<impl AsRef<OsStr>>, default: T, choices: &[(&str, T)]) -> Result<T> {
    let Some(v) = v else { return Ok(default) };
    let v = v.as_ref();
    let s = v.to_str().map(str::trim);
    match choices.iter().find(|(name, _)| s.is_some_and(|s| s.eq_ignore_ascii_case(name))) {
        Some(&(_, t)) => Ok(t),
        None => {
            let names: Vec<String> = choices.iter().map(|(name, _)| format!("`{name}`")).collect();
            Err(Error::Bootstrap(format!("{var}={v:?}: expected {}", names.join(" or "))))
        }
    }
}

/// `var`'s value `v` as a switch: `0` (off) or `1` (on), `default` when unset.
pub(crate) fn flag(var: &str, v: Option<impl AsRef<OsStr>>, default: bool) -> Result<bool> {
    choice(var, v, default, &[("0", false), ("1", true)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_whole_and_in_range_or_an_error_naming_the_variable() {
        let n = |v: Option<&str>| number("EMBER_TEST_N", v, 7, 1..=100, "bytes");
        assert_eq!(n(None).unwrap(), 7);
        assert_eq!(n(Some("1")).unwrap(), 1);
        assert_eq!(n(Some(" 100\n")).unwrap(), 100);
        for bad in ["0", "101", "-1", "+5", "4k", "abc", "", " ", "1.5", "18446744073709551616"] {
            let e = n(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("EMBER_TEST_N") && e.contains("bytes from 1 to 100"), "{bad:?}: {e}");
        }
        // Not UTF-8: an error too, showing the bytes.
        use std::os::unix::ffi::OsStrExt;
        let e = number("EMBER_TEST_N", Some(OsStr::from_bytes(b"1\xff")), 7, 0..=9, "bytes").unwrap_err().to_string();
        assert!(e.contains("EMBER_TEST_N"), "{e}");
    }

    #[test]
    fn choices_and_flags_take_their_names_only() {
        #[derive(Clone, Copy, Debug, PartialEq)]
        enum C {
            A,
            B,
        }
        let c = |v: Option<&str>| choice("EMBER_TEST_C", v, C::A, &[("auto", C::A), ("staged", C::B)]);
        assert_eq!(c(None).unwrap(), C::A);
        assert_eq!(c(Some("STAGED")).unwrap(), C::B);
        assert_eq!(c(Some("auto")).unwrap(), C::A);
        for bad in ["", "stage", "cma", "1"] {
            let e = c(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("EMBER_TEST_C") && e.contains("`auto` or `staged`"), "{bad:?}: {e}");
        }
        let f = |v: Option<&str>| flag("EMBER_TEST_F", v, true);
        assert!(f(None).unwrap() && f(Some("1")).unwrap() && !f(Some("0")).unwrap());
        for bad in ["", "yes", "off", "2", "00"] {
            let e = f(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("EMBER_TEST_F") && e.contains("`0` or `1`"), "{bad:?}: {e}");
        }
    }
}
