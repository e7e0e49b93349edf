//! Which RDMA device and port a process uses: its configuration (`EMBER_IB_*`), the discovery
//! of devices, active ports and the GID (`open_port`, [`probe`]), and what was found
//! ([`PortInfo`]).
use super::sys;
use ibverbs_sys as ffi;

/// Which device, port and GID index to use, and the queue geometry.
#[derive(Clone, Debug, Default)]
pub struct IbConfig {
    /// `EMBER_IB_DEVICE`: a device name (`mlx5_0`), or a comma-separated list of which this
    /// process takes entry `local_rank % len` (one NIC per GPU). Default: the first device with
    /// an active port.
    pub device: Option<String>,
    /// `EMBER_IB_PORT` (default: the first active port of the device, usually 1).
    pub port: Option<u8>,
    /// `EMBER_IB_GID_INDEX`: GID table index (RoCE; on InfiniBand only used with a GRH).
    /// Default on RoCE: the first RoCE v2 entry holding an IPv4 address, else the first RoCE v2
    /// entry, else 0.
    pub gid_index: Option<u32>,
    /// This process's rank on its host (selects from a device list).
    pub local_rank: usize,
}

impl IbConfig {
    /// From `EMBER_IB_DEVICE`, `EMBER_IB_PORT`, `EMBER_IB_GID_INDEX`.
    pub fn from_env(local_rank: usize) -> Result<IbConfig, String> {
        Self::from_vars(|k| std::env::var(k).ok(), local_rank)
    }

    pub fn from_vars(get: impl Fn(&str) -> Option<String>, local_rank: usize) -> Result<IbConfig, String> {
        let num = |k: &str| -> Result<Option<u32>, String> {
            match get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| format!("{k}={v:?} is not a number")),
            }
        };
        let port = match num("EMBER_IB_PORT")? {
            None => None,
            Some(p) if (1..=255).contains(&p) => Some(p as u8),
            Some(p) => return Err(format!("EMBER_IB_PORT={p}: ports are numbered 1..=255")),
        };
        let device = get("EMBER_IB_DEVICE").map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        Ok(IbConfig { device, port, gid_index: num("EMBER_IB_GID_INDEX")?, local_rank })
    }

    /// The device name this process asks for, if any.
    pub fn wanted_device(&self) -> Option<String> {
        let list: Vec<&str> = self.device.as_deref()?.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        (!list.is_empty()).then(|| list[self.local_rank % list.len()].to_string())
    }
}

/// The port a process would use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub device: String,
    pub port: u8,
    /// RoCE (Ethernet link layer) rather than InfiniBand.
    pub roce: bool,
    pub lid: u16,
    /// `ibv_mtu` enum value of the active MTU (1 = 256 B ... 5 = 4096 B).
    pub mtu: u8,
    pub gid_index: u32,
    pub gid: [u8; 16],
    /// Active width x speed, as the kernel reports it (e.g. "4X HDR"), when known.
    pub rate: String,
}

impl std::fmt::Display for PortInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mtu = 128u32 << self.mtu.min(5);
        if self.roce {
            write!(f, "{} port {} (RoCE, GID index {} {}, MTU {mtu}", self.device, self.port, self.gid_index, fmt_gid(&self.gid))?;
        } else {
            write!(f, "{} port {} (InfiniBand, LID {}, MTU {mtu}", self.device, self.port, self.lid)?;
        }
        if !self.rate.is_empty() {
            write!(f, ", {}", self.rate)?;
        }
        write!(f, ")")
    }
}

fn fmt_gid(g: &[u8; 16]) -> String {
    if g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff {
        return format!("::ffff:{}.{}.{}.{}", g[12], g[13], g[14], g[15]);
    }
    g.chunks(2).map(|c| format!("{:x}", u16::from_be_bytes([c[0], c[1]]))).collect::<Vec<_>>().join(":")
}

/// GID type from sysfs ("RoCE v2", "IB/RoCE v1"), if the kernel tells.
fn gid_type(dev: &str, port: u8, index: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/infiniband/{dev}/ports/{port}/gid_attrs/types/{index}")).ok().map(|s| s.trim().to_string())
}

fn port_rate(dev: &str, port: u8) -> String {
    std::fs::read_to_string(format!("/sys/class/infiniband/{dev}/ports/{port}/rate")).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Pick the GID index (RoCE default: first RoCE v2 entry with an IPv4-mapped address, else the
/// first RoCE v2 entry, else 0; InfiniBand default 0).
///
/// # Safety
/// `ctx` open.
unsafe fn pick_gid(ctx: *mut ffi::ibv_context, dev: &str, port: u8, roce: bool, table_len: i32, want: Option<u32>) -> Result<(u32, [u8; 16]), String> {
    if let Some(i) = want {
        if table_len > 0 && i as i64 >= table_len as i64 {
            return Err(format!("EMBER_IB_GID_INDEX={i}: {dev} port {port} has {table_len} GID entries"));
        }
        // SAFETY: `ctx` is open (this function's contract).
        return Ok((i, unsafe { sys::query_gid(ctx, port, i) }?));
    }
    if roce {
        let mut first_v2 = None;
        for i in 0..table_len.clamp(0, 256) as u32 {
            // SAFETY: `ctx` is open (this function's contract).
            let Ok(g) = (unsafe { sys::query_gid(ctx, port, i) }) else { continue };
            if g.iter().all(|&b| b == 0) {
                continue;
            }
            if gid_type(dev, port, i).is_some_and(|t| t.contains("v2")) {
                if g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff {
                    return Ok((i, g));
                }
                first_v2.get_or_insert((i, g));
            }
        }
        if let Some(x) = first_v2 {
            return Ok(x);
        }
    }
    // SAFETY: `ctx` is open (this function's contract).
    Ok((0, unsafe { sys::query_gid(ctx, port, 0) }.unwrap_or([0; 16])))
}

/// Open the device and port this process should use. Returns the context (caller closes it).
pub(super) fn open_port(cfg: &IbConfig) -> Result<(*mut ffi::ibv_context, PortInfo, ffi::ibv_device_attr), String> {
    // SAFETY: plain library calls on pointers the library handed us; the list is freed on
    // every path after the chosen device is opened (an open context outlives the list).
    unsafe {
        let (list, devs) = sys::devices()?;
        let res = (|| {
            if devs.is_empty() {
                return Err("no RDMA device found (ibv_get_device_list returned none: no InfiniBand/RoCE adapter, or its driver/provider is not loaded)".to_string());
            }
            let want = cfg.wanted_device();
            if let Some(w) = &want {
                if !devs.iter().any(|(n, _)| n == w) {
                    let names: Vec<&str> = devs.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(format!("EMBER_IB_DEVICE: no RDMA device named {w:?} (found: {})", names.join(", ")));
                }
            }
            let mut why = Vec::new();
            for (name, d) in &devs {
                if want.as_ref().is_some_and(|w| w != name) {
                    continue;
                }
                let ctx = match sys::open(*d, name) {
                    Ok(c) => c,
                    Err(e) => {
                        why.push(e);
                        continue;
                    }
                };
                let found = (|| -> Result<Option<(PortInfo, ffi::ibv_device_attr)>, String> {
                    let da = sys::query_device(ctx)?;
                    let ports: Vec<u8> = match cfg.port {
                        Some(p) => vec![p],
                        None => (1..=da.phys_port_cnt.max(1)).collect(),
                    };
                    for p in ports {
                        let pa = match sys::query_port(ctx, p) {
                            Ok(a) => a,
                            Err(e) => {
                                why.push(format!("{name}: {e}"));
                                continue;
                            }
                        };
                        if pa.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
                            why.push(format!("{name} port {p} is not active (state {})", pa.state));
                            continue;
                        }
                        let roce = pa.link_layer as u32 == ffi::IBV_LINK_LAYER_ETHERNET;
                        let (gid_index, gid) = pick_gid(ctx, name, p, roce, pa.gid_tbl_len, cfg.gid_index)?;
                        if roce && gid.iter().all(|&b| b == 0) {
                            why.push(format!("{name} port {p} (RoCE) has no usable GID (set EMBER_IB_GID_INDEX)"));
                            continue;
                        }
                        let info = PortInfo { device: name.clone(), port: p, roce, lid: pa.lid, mtu: pa.active_mtu as u8, gid_index, gid, rate: port_rate(name, p) };
                        return Ok(Some((info, da)));
                    }
                    Ok(None)
                })();
                match found {
                    Ok(Some((info, da))) => return Ok((ctx, info, da)),
                    Ok(None) => sys::close(ctx),
                    Err(e) => {
                        sys::close(ctx);
                        return Err(e);
                    }
                }
            }
            Err(format!("no active RDMA port: {}", why.join("; ")))
        })();
        sys::free_devices(list);
        res
    }
}

/// The port this process would use, or why there is none. Opens and closes the device.
pub fn probe(cfg: &IbConfig) -> Result<PortInfo, String> {
    let (ctx, info, _) = open_port(cfg)?;
    // SAFETY: opened above, not used after.
    unsafe { sys::close(ctx) };
    Ok(info)
}
