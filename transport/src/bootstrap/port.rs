//! Picking a free TCP port for a rendezvous (launchers and tests).
use crate::error::{Error, Result};
use std::net::TcpListener;

/// A free TCP port for a rendezvous (launchers and tests). Racy by nature: the port is free
/// now, and rank 0 binds it a moment later. To keep that window safe from the many outgoing
/// connections a job opens (their local ports come from the kernel's ephemeral range, where
/// `bind(0)` would pick too), it is drawn at random from below that range (or above it, when
/// the range starts low) and checked bindable on every interface.
pub fn free_port() -> Result<u16> {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let (from, to) = if lo >= 12_000 { (lo - 10_000, lo) } else { (hi + 1, 65_536) };
    let mut seed = u32::from_str_radix(&crate::auth::new_token()[..8], 16).unwrap_or(1);
    for _ in 0..if to > from { 64 } else { 0 } {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let port = (from + seed % (to - from)) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Bootstrap(e.to_string()))?;
    Ok(l.local_addr().map_err(|e| Error::Bootstrap(e.to_string()))?.port())
}
