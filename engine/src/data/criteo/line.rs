//! One Criteo line parsed into a sample: the fields split at the delimiter, the label checked,
//! integers through `ln(1 + max(x, 0))` (a table for the small ones), hex categoricals reduced
//! modulo the table's rows (the parent module's doc gives the preprocessing).
use crate::config::ModelConfig;
use crate::data::Batch;

/// Integers below this use a precomputed `ln(1 + x)` table.
const LN_TABLE: usize = 4096;

/// Parses one line into a batch (the preprocessing of the `criteo` module doc). Reusable across lines.
#[derive(Clone, Debug)]
pub struct LineParser {
    delim: u8,
    num_dense: usize,
    rows: Vec<u64>,
    /// Lemire fastmod constants for rows < 2^32 (0 otherwise).
    fastmod: Vec<u64>,
    ln_table: &'static [f32],
    dense: Vec<f32>,
    ids: Vec<Option<u64>>,
}

/// `ln(1 + max(x, 0))` as f32 (computed in f64).
#[inline]
pub fn log_transform(x: f64) -> f32 {
    x.max(0.0).ln_1p() as f32
}

/// `ln(1 + x)` for the integers below [`LN_TABLE`], computed once per process.
fn ln_table() -> &'static [f32] {
    static T: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    T.get_or_init(|| (0..LN_TABLE).map(|x| log_transform(x as f64)).collect())
}

#[inline]
fn fastmod_u32(a: u32, m: u64, d: u64) -> u64 {
    let low = m.wrapping_mul(a as u64);
    ((low as u128 * d as u128) >> 64) as u64
}

fn show(field: &[u8]) -> String {
    let s = String::from_utf8_lossy(field);
    if s.len() > 40 {
        format!("{:?}...", &s[..s.char_indices().nth(40).map(|c| c.0).unwrap_or(s.len())])
    } else {
        format!("{s:?}")
    }
}

#[inline]
pub(super) fn parse_number(f: &[u8]) -> Option<f64> {
    // Fast path: optional '-', 1..=18 digits.
    let (neg, mut digits) = match f.first() {
        Some(b'-') => (true, &f[1..]),
        _ => (false, f),
    };
    // "260.0": integral values written as floats.
    if let Some(dot) = digits.iter().position(|&c| c == b'.') {
        if dot > 0 && digits[dot + 1..].iter().all(|&c| c == b'0') {
            digits = &digits[..dot];
        } else {
            digits = &[];
        }
    }
    if !digits.is_empty() && digits.len() <= 18 && digits.iter().all(|c| c.is_ascii_digit()) {
        let v = digits.iter().fold(0i64, |acc, &c| acc * 10 + (c - b'0') as i64);
        return Some(if neg { -v as f64 } else { v as f64 });
    }
    let v: f64 = std::str::from_utf8(f).ok()?.trim().parse().ok()?;
    v.is_finite().then_some(v)
}

/// Hex digit values; 0x80 marks a non-hex byte.
const HEX: [u8; 256] = {
    let mut t = [0x80u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

#[inline]
fn parse_hex(f: &[u8]) -> Option<u64> {
    if f.is_empty() || f.len() > 16 {
        return None;
    }
    // Branch-free over the digits: accumulate the invalid marks and test once.
    let (mut v, mut bad) = (0u64, 0u8);
    for &c in f {
        let d = HEX[c as usize];
        bad |= d;
        v = (v << 4) | (d & 0x0F) as u64;
    }
    (bad & 0x80 == 0).then_some(v)
}

impl LineParser {
    pub fn new(model: &ModelConfig, delimiter: u8) -> Self {
        let rows: Vec<u64> = model.tables.iter().map(|t| t.rows.max(1)).collect();
        let fastmod = rows.iter().map(|&d| if d < 1 << 32 { (u64::MAX / d).wrapping_add(1) } else { 0 }).collect();
        LineParser {
            delim: delimiter,
            num_dense: model.num_dense,
            fastmod,
            ln_table: ln_table(),
            dense: vec![0.0; model.num_dense],
            ids: vec![None; rows.len()],
            rows,
        }
    }

    /// Fields per line: label + integers + categoricals.
    pub fn fields(&self) -> usize {
        1 + self.num_dense + self.rows.len()
    }

    /// Parses `line` (without its newline) and appends the sample to `out`; on error `out` is
    /// unchanged and the message says which field is bad.
    pub fn parse_into(&mut self, line: &[u8], out: &mut Batch) -> std::result::Result<(), String> {
        let expected = self.fields();
        let delim = self.delim;
        let count_err = || {
            let got = line.iter().filter(|&&c| c == delim).count() + 1;
            format!("{got} fields, expected {expected} (label + {} integer + {} categorical)", self.num_dense, self.rows.len())
        };
        // Field cursor: `next()` returns the next field, None past the end of the line.
        let mut at = 0usize;
        let mut done = false;
        let mut next = || -> Option<&[u8]> {
            if done {
                return None;
            }
            let rest = &line[at..];
            match rest.iter().position(|&c| c == delim) {
                Some(i) => {
                    at += i + 1;
                    Some(&rest[..i])
                }
                None => {
                    done = true;
                    Some(rest)
                }
            }
        };
        let lf = next().ok_or_else(count_err)?;
        let label = match lf {
            b"0" => 0.0,
            b"1" => 1.0,
            _ => match parse_number(lf) {
                Some(v) if v == 0.0 || v == 1.0 => v as f32,
                _ => return Err(format!("label {} is not 0 or 1", show(lf))),
            },
        };
        for j in 0..self.num_dense {
            let f = next().ok_or_else(count_err)?;
            self.dense[j] = if f.is_empty() {
                0.0
            } else {
                let x = parse_number(f).ok_or_else(|| format!("integer feature I{} = {} is not a number", j + 1, show(f)))?;
                if x >= 0.0 && x < LN_TABLE as f64 && x.fract() == 0.0 {
                    self.ln_table[x as usize]
                } else {
                    log_transform(x)
                }
            };
        }
        for t in 0..self.rows.len() {
            let f = next().ok_or_else(count_err)?;
            self.ids[t] = if f.is_empty() {
                None
            } else {
                let v = parse_hex(f).ok_or_else(|| format!("categorical feature C{} = {} is not a hex id", t + 1, show(f)))?;
                let m = self.fastmod[t];
                Some(if m != 0 && v < 1 << 32 { fastmod_u32(v as u32, m, self.rows[t]) } else { v % self.rows[t] })
            };
        }
        if next().is_some() {
            return Err(count_err());
        }
        out.labels.push(label);
        out.dense.extend_from_slice(&self.dense);
        for (j, id) in out.sparse.iter_mut().zip(&self.ids) {
            match id {
                Some(v) => {
                    j.lengths.push(1);
                    j.values.push(*v);
                }
                None => j.lengths.push(0),
            }
        }
        Ok(())
    }
}

