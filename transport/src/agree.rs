//! Agreement on a step every rank ran locally: each reports success or why it failed, and every
//! rank gets the same verdict (the job's setup steps use it so that no rank goes on alone).
use crate::comm::Comm;
use crate::error::Result;

/// Every rank reports whether its step succeeded; the answer is the same on every rank:
/// `Ok(())`, or `Err("rank r: why")` naming the first rank that failed. (The outer error: the
/// shm/TCP communicator itself failed.)
pub(crate) fn agree(host: &Comm, mine: std::result::Result<(), String>) -> Result<std::result::Result<(), String>> {
    let text = match &mine {
        Ok(()) => Vec::new(),
        Err(e) => {
            let mut b = if e.is_empty() { b"failed".to_vec() } else { e.as_bytes().to_vec() };
            b.truncate(1000);
            b
        }
    };
    let (all, counts) = host.all_gather_alloc(&text)?;
    let mut fails = Vec::new();
    let mut off = 0;
    for (r, &c) in counts.iter().enumerate() {
        if c > 0 {
            fails.push(format!("rank {r}: {}", String::from_utf8_lossy(&all[off..off + c])));
        }
        off += c;
    }
    Ok(match fails.len() {
        0 => Ok(()),
        1 => Err(fails.remove(0)),
        k => Err(format!("{} (and {} more rank(s))", fails[0], k - 1)),
    })
}
