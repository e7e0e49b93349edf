//! The ceilings a benchmark row can be compared with, measured in the same run: memcpy (the
//! copies the collective must make) and loopback TCP streams (docs/transport.md derives them).
use super::BenchOptions;
use crate::Comm;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

/// Which ceiling (`--baseline`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Baseline {
    /// Each rank copies the bytes it sends once, all ranks at once.
    Memcpy,
    /// One loopback stream from rank 0's process to rank 1's, with the ranks' own pinning.
    Tcp,
    /// One loopback stream with both ends in rank 0's process.
    Tcp1,
    /// Rank 0 and rank 1 stream to each other at once (the 2-rank all-to-all's traffic).
    Tcp2,
}

impl Baseline {
    pub(super) fn parse(s: &str) -> Result<Baseline, String> {
        Ok(match s {
            "memcpy" => Baseline::Memcpy,
            "tcp" => Baseline::Tcp,
            "tcp1" => Baseline::Tcp1,
            "tcp2" => Baseline::Tcp2,
            o => return Err(format!("unknown --baseline '{o}' (memcpy, tcp, tcp1, tcp2)")),
        })
    }

    /// The ceiling's time per iteration (the slowest rank's, identical on every rank) for one
    /// size: `size` bytes per block, `send_len` floats in a rank's send buffer.
    pub(super) fn measure(self, c: &Comm, size: usize, send_len: usize, o: &BenchOptions) -> Result<f64, String> {
        let e = |e: crate::Error| e.to_string();
        let (n, me, iters) = (c.size(), c.rank(), o.iters.max(1));
        c.barrier().map_err(e)?;
        let us = match self {
            Baseline::Memcpy => {
                let mut src = super::buffers::alloc(send_len, o.no_huge);
                src.fill(1.0);
                let mut dst = super::buffers::alloc(send_len, o.no_huge);
                dst.fill(0.0);
                c.barrier().map_err(e)?;
                let t = Instant::now();
                for _ in 0..o.iters {
                    dst.copy_from_slice(std::hint::black_box(&src));
                    std::hint::black_box(&mut dst);
                }
                return super::max_over(c, t.elapsed().as_secs_f64() * 1e6 / iters as f64).map_err(e);
            }
            // One loopback stream, rank 0 -> rank 1, carrying the bytes one rank sends to its peers.
            Baseline::Tcp if n >= 2 => tcp_pair_stream_us(c, size * (n - 1), iters)?,
            Baseline::Tcp2 if n >= 2 => tcp_bidir_us(c, size * (n - 1), iters)?,
            // Both ends in rank 0's process (on its core when pinned).
            Baseline::Tcp | Baseline::Tcp1 | Baseline::Tcp2 if me == 0 => tcp_stream_us(size * (n - 1).max(1), iters).map_err(|x| x.to_string())?,
            Baseline::Tcp | Baseline::Tcp1 | Baseline::Tcp2 => 0.0,
        };
        c.barrier().map_err(e)?;
        super::max_over(c, us).map_err(e)
    }
}

/// Receiving end of a baseline stream: `total` bytes into a buffer of `chunk` bytes (the size
/// of what the collective lands per iteration, so both write the same memory footprint).
fn stream_sink(s: &mut TcpStream, chunk: usize, total: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; chunk.max(1)];
    let mut got = 0;
    while got < total {
        let off = got % buf.len();
        let n = s.read(&mut buf[off..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    s.write_all(&[1])
}

/// Sending end: `iters` writes of `bytes`, then wait for the receiver's acknowledgement.
fn stream_source(s: &mut TcpStream, bytes: usize, iters: usize) -> std::io::Result<f64> {
    s.set_nodelay(true)?;
    let data = vec![1u8; bytes];
    let t = Instant::now();
    for _ in 0..iters {
        s.write_all(&data)?;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / iters as f64)
}

/// One loopback stream with both ends in this process (`--baseline tcp1`).
fn tcp_stream_us(bytes: usize, iters: usize) -> std::io::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        stream_sink(&mut s, bytes, bytes * iters)
    });
    let mut s = TcpStream::connect(addr)?;
    let us = stream_source(&mut s, bytes, iters)?;
    rx.join().map_err(|_| std::io::Error::other("reader panicked"))??;
    Ok(us)
}

/// One loopback stream from rank 0's process to rank 1's (`--baseline tcp`): the two ends run
/// where the ranks run, with their pinning. Returns the time per iteration on rank 0 (0 elsewhere).
fn tcp_pair_stream_us(c: &Comm, bytes: usize, iters: usize) -> Result<f64, String> {
    let e = |e: crate::Error| e.to_string();
    let io = |e: std::io::Error| format!("tcp baseline: {e}");
    let me = c.rank();
    let l = if me == 1 { Some(TcpListener::bind("127.0.0.1:0").map_err(io)?) } else { None };
    let mut port = [l.as_ref().map(|l| l.local_addr().map(|a| a.port() as u64)).transpose().map_err(io)?.unwrap_or(0)];
    c.broadcast(&mut port, 1).map_err(e)?;
    match (me, l) {
        (0, _) => {
            let mut s = TcpStream::connect(("127.0.0.1", port[0] as u16)).map_err(io)?;
            stream_source(&mut s, bytes, iters).map_err(io)
        }
        (1, Some(l)) => {
            let (mut s, _) = l.accept().map_err(io)?;
            stream_sink(&mut s, bytes, bytes * iters).map_err(io)?;
            Ok(0.0)
        }
        _ => Ok(0.0),
    }
}

/// Both directions at once between rank 0 and rank 1 (`--baseline tcp2`): each sends `bytes`
/// per iteration to the other over its own loopback connection, as the 2-rank all-to-all does,
/// with no protocol. Returns the slower rank's time per iteration (0 on other ranks).
fn tcp_bidir_us(c: &Comm, bytes: usize, iters: usize) -> Result<f64, String> {
    let e = |e: crate::Error| e.to_string();
    let io = |e: std::io::Error| format!("tcp baseline: {e}");
    let me = c.rank();
    let l = if me <= 1 { Some(TcpListener::bind("127.0.0.1:0").map_err(io)?) } else { None };
    let mine = [l.as_ref().map(|l| l.local_addr().map(|a| a.port() as u64)).transpose().map_err(io)?.unwrap_or(0)];
    let mut ports = vec![0u64; c.size()];
    c.all_gather(&mine, &mut ports).map_err(e)?;
    let Some(l) = l else { return Ok(0.0) };
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        stream_sink(&mut s, bytes, bytes * iters)
    });
    let mut s = TcpStream::connect(("127.0.0.1", ports[1 - me] as u16)).map_err(io)?;
    let us = stream_source(&mut s, bytes, iters).map_err(io)?;
    sink.join().map_err(|_| "tcp baseline: reader panicked".to_string())?.map_err(io)?;
    Ok(us)
}
