//! Who sends for an address: a capture at the switch of every frame a host
//! sends with one of the watched addresses as its IP source, as the sender
//! of an ARP packet, or as the target of an IPv6 neighbour advertisement.
//! The switch port a frame came in by names its sender, whatever MAC or
//! address it claims; so a test sees when two nodes answered for a VIP at
//! once, or a fenced node spoke again.
//!
//! `tcpdump` writes a pcap file (`-i any -Q in`, cooked v2 headers, which
//! carry the interface index), read back here. No frame sent before
//! [`SenderWatch::finish`] is lost: the watch waits until a marker datagram,
//! sent on the switch's loopback after the caller's frames, is in the file
//! before stopping tcpdump, and fails if the kernel dropped any frame.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::shell::{ip_json, require};
use crate::{switch_netns, Lab, LabError};

/// One frame a host sent for a watched address.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SentFrame {
    /// Capture time, in seconds of the machine's wall clock.
    pub at: f64,
    /// The host whose switch port the frame came in by.
    pub host: String,
    /// The watched address the frame spoke for.
    pub addr: IpAddr,
    /// `ip` (the address is the IP source), `arp` (the ARP sender) or `na`
    /// (the target of a neighbour advertisement).
    pub kind: String,
}

/// Consecutive frames of one host for one address.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SenderRun {
    pub host: String,
    pub first: f64,
    pub last: f64,
    pub frames: usize,
}

/// The frames for `addr`, in the order given, grouped into runs of one
/// sender: after a clean failover, `[old holder, new holder]`.
pub fn sender_runs(frames: &[SentFrame], addr: IpAddr) -> Vec<SenderRun> {
    let mut runs: Vec<SenderRun> = Vec::new();
    for frame in frames.iter().filter(|f| f.addr == addr) {
        match runs.last_mut() {
            Some(run) if run.host == frame.host => {
                run.last = frame.at;
                run.frames += 1;
            }
            _ => runs.push(SenderRun {
                host: frame.host.clone(),
                first: frame.at,
                last: frame.at,
                frames: 1,
            }),
        }
    }
    runs
}

/// A description of the overlap when some host sent for `addr` in two runs
/// with another host's run between them (A…B…A: two hosts answered for
/// the address at once, or a fenced one spoke again); `None` otherwise.
pub fn speakers_overlap(frames: &[SentFrame], addr: IpAddr) -> Option<String> {
    let runs = sender_runs(frames, addr);
    let (i, j) = runs.iter().enumerate().find_map(|(i, run)| {
        runs.iter()
            .enumerate()
            .skip(i + 2)
            .find(|(_, later)| later.host == run.host)
            .map(|(j, _)| (i, j))
    })?;
    let summary: Vec<String> = runs
        .iter()
        .map(|r| format!("{} x{} {:.6}-{:.6}", r.host, r.frames, r.first, r.last))
        .collect();
    Some(format!(
        "{} sent for {addr} again at {:.6}, after {} had at {:.6} (runs: {})",
        runs[i].host,
        runs[j].first,
        runs[i + 1].host,
        runs[i + 1].first,
        summary.join(", ")
    ))
}

/// A running capture; see the module docs. Dropped without
/// [`SenderWatch::finish`], it kills tcpdump and removes its file.
#[derive(Debug)]
pub struct SenderWatch<'lab> {
    lab: &'lab Lab,
    /// tcpdump's, until it is stopped.
    pid: Option<u32>,
    dir: PathBuf,
    addrs: Vec<IpAddr>,
    /// Interface index of each host's switch port, to the host's name.
    ports: HashMap<u32, String>,
    /// Markers sent so far.
    markers: u32,
}

/// UDP port the markers go to, on the switch's loopback (discard).
const MARKER_PORT: u16 = 9;
/// What a marker's payload starts with; its sequence number follows.
const MARKER_TAG: &[u8] = b"baton-lab-watch-";
/// Enough of each frame for every field read here: cooked v2 header (20),
/// then an IPv6 header and a neighbour advertisement up to its target
/// (64), or a marker.
const SNAPLEN: &str = "96";
/// The capture ring, in KiB: room for bursts of a busy VIP.
const BUFFER_KIB: &str = "16384";
/// How long tcpdump may take to start capturing, or to catch up.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

static WATCH_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Starts watching which hosts send for `addrs` (see [`SenderWatch`]).
    /// Returns once the capture runs: every frame sent after it is seen.
    pub fn watch_senders(&self, addrs: &[IpAddr]) -> Result<SenderWatch<'_>, LabError> {
        require("tcpdump", "tcpdump")?;
        let mut addrs = addrs.to_vec();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(LabError::Watch("no address to watch".into()));
        }
        let sw = switch_netns(&self.name);
        let mut ports = HashMap::new();
        for link in ip_json(&["-n", &sw, "link", "show"])? {
            let index = link.get("ifindex").and_then(|i| i.as_u64());
            let name = link.get("ifname").and_then(|n| n.as_str());
            let host = self.hosts.iter().find(|h| Some(h.port.as_str()) == name);
            if let (Some(index), Some(host)) = (index, host) {
                ports.insert(index as u32, host.name.clone());
            }
        }
        let n = WATCH_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = crate::state_root(&self.name).join(format!("watch-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut watch = SenderWatch {
            lab: self,
            pid: None,
            dir,
            addrs,
            ports,
            markers: 0,
        };
        let log = std::fs::File::create(watch.log_path())?;
        let mut command = baton_net::netns::command_in(&sw, "tcpdump");
        command
            .args(["-i", "any", "-Q", "in", "-n", "-y", "LINUX_SLL2"])
            .args(["-s", SNAPLEN, "-B", BUFFER_KIB, "--immediate-mode", "-U"])
            // Stays root: the file is in a directory of root's.
            .args(["-Z", "root", "-w"])
            .arg(watch.pcap_path())
            .arg(filter(&watch.addrs))
            .stdout(std::process::Stdio::null())
            .stderr(log);
        watch.pid = Some(self.spawn(command)?);
        watch.sync("starting")?;
        Ok(watch)
    }
}

impl SenderWatch<'_> {
    /// Stops the capture and returns the frames, in time order.
    pub fn finish(mut self) -> Result<Vec<SentFrame>, LabError> {
        let caught_up = self.sync("finishing");
        if let Some(pid) = self.pid.take() {
            self.lab.stop(pid, Duration::from_secs(5));
        }
        caught_up?;
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let dropped = log
            .lines()
            .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
            .and_then(|n| n.trim().parse::<u64>().ok());
        match dropped {
            Some(0) => {}
            Some(n) => {
                return Err(LabError::Watch(format!(
                    "the kernel dropped {n} captured frames: the capture is incomplete"
                )))
            }
            None => tracing::warn!(log = %log.trim(), "tcpdump reported no drop count"),
        }
        let data = std::fs::read(self.pcap_path())?;
        let (format, start) = pcap_header(&data).map_err(LabError::Watch)?;
        let (records, _) = pcap_records(&data, format, start);
        let mut frames: Vec<SentFrame> = records
            .iter()
            .filter_map(|r| {
                let host = self.ports.get(&r.ifindex)?;
                let (addr, kind) = classify(r.protocol, r.payload, &self.addrs)?;
                Some(SentFrame {
                    at: r.at,
                    host: host.clone(),
                    addr,
                    kind: kind.to_owned(),
                })
            })
            .collect();
        frames.sort_by(|a, b| a.at.total_cmp(&b.at));
        Ok(frames)
    }

    fn pcap_path(&self) -> PathBuf {
        self.dir.join("senders.pcap")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("tcpdump.log")
    }

    /// Sends a marker on the switch's loopback, again every 100 ms, until
    /// one is in the file: then tcpdump captures, and has written every
    /// frame it got before the first marker.
    fn sync(&mut self, doing: &str) -> Result<(), LabError> {
        let Some(pid) = self.pid else {
            return Err(LabError::Watch("tcpdump is not running".into()));
        };
        let first = self.markers;
        let sw = baton_net::netns::named_path(&switch_netns(&self.lab.name));
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut next_send = Instant::now();
        let mut reader = Tail::default();
        loop {
            if Instant::now() >= next_send {
                let seq = self.markers;
                self.markers += 1;
                baton_net::netns::run_in(&sw, move || send_marker(seq))??;
                next_send = Instant::now() + Duration::from_millis(100);
            }
            std::thread::sleep(Duration::from_millis(10));
            if reader
                .read_new(&self.pcap_path())?
                .iter()
                .any(|r| marker_seq(r).is_some_and(|seq| seq >= first))
            {
                return Ok(());
            }
            if self.lab.has_exited(pid) || Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let log = log.split_whitespace().collect::<Vec<_>>().join(" ");
                let what = if self.lab.has_exited(pid) {
                    "tcpdump exited"
                } else {
                    "tcpdump did not catch up"
                };
                return Err(LabError::Watch(format!("{what} while {doing}: {log}")));
            }
        }
    }
}

impl Drop for SenderWatch<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            self.lab.kill(pid);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn send_marker(seq: u32) -> std::io::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut payload = MARKER_TAG.to_vec();
    payload.extend_from_slice(seq.to_string().as_bytes());
    socket.send_to(&payload, (Ipv4Addr::LOCALHOST, MARKER_PORT))?;
    Ok(())
}

/// The pcap-filter expression of a watch of `addrs`, markers included.
/// A neighbour advertisement is matched only with ICMPv6 right after the
/// IPv6 header (no extension header), as hosts send them.
fn filter(addrs: &[IpAddr]) -> String {
    let mut clauses = vec![format!(
        "(ip dst host {} and udp dst port {MARKER_PORT})",
        Ipv4Addr::LOCALHOST
    )];
    for addr in addrs {
        match addr {
            IpAddr::V4(a) => {
                clauses.push(format!("(ip src host {a})"));
                clauses.push(format!("(arp src host {a})"));
            }
            IpAddr::V6(a) => {
                clauses.push(format!("(ip6 src host {a})"));
                let words: Vec<String> = a
                    .octets()
                    .chunks(4)
                    .zip((48..).step_by(4))
                    .map(|(w, at)| {
                        let w = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
                        format!("ip6[{at}:4] = {w:#010x}")
                    })
                    .collect();
                clauses.push(format!(
                    "(ip6[6] = 58 and ip6[40] = 136 and {})",
                    words.join(" and ")
                ));
            }
        }
    }
    clauses.join(" or ")
}

/// The watched address a frame speaks for, and how.
fn classify(protocol: u16, p: &[u8], addrs: &[IpAddr]) -> Option<(IpAddr, &'static str)> {
    let watched = |a: IpAddr| addrs.contains(&a).then_some(a);
    match protocol {
        0x0800 if p.len() >= 20 && p[0] >> 4 == 4 => {
            let src = <[u8; 4]>::try_from(&p[12..16]).ok()?;
            Some((watched(Ipv4Addr::from(src).into())?, "ip"))
        }
        0x86dd if p.len() >= 40 && p[0] >> 4 == 6 => {
            if p.len() >= 64 && p[6] == 58 && p[40] == 136 {
                let target = <[u8; 16]>::try_from(&p[48..64]).ok()?;
                if let Some(a) = watched(Ipv6Addr::from(target).into()) {
                    return Some((a, "na"));
                }
            }
            let src = <[u8; 16]>::try_from(&p[8..24]).ok()?;
            Some((watched(Ipv6Addr::from(src).into())?, "ip"))
        }
        0x0806 if p.len() >= 8 => {
            // Sender protocol address after the sender hardware address.
            let (ptype, hlen, plen) = (u16::from_be_bytes([p[2], p[3]]), p[4], p[5]);
            let at = 8 + usize::from(hlen);
            if ptype != 0x0800 || plen != 4 || p.len() < at + 4 {
                return None;
            }
            let spa = <[u8; 4]>::try_from(&p[at..at + 4]).ok()?;
            Some((watched(Ipv4Addr::from(spa).into())?, "arp"))
        }
        _ => None,
    }
}

/// The sequence number of a marker record.
fn marker_seq(r: &Record<'_>) -> Option<u32> {
    let p = r.payload;
    if r.protocol != 0x0800 || p.len() < 20 || p[9] != 17 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let udp = p.get(ihl..ihl + 8)?;
    if p[16..20] != Ipv4Addr::LOCALHOST.octets() || udp[2..4] != MARKER_PORT.to_be_bytes() {
        return None;
    }
    let digits = p.get(ihl + 8..)?.strip_prefix(MARKER_TAG)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `LINKTYPE_LINUX_SLL2`: the cooked header with the interface index.
const LINKTYPE_LINUX_SLL2: u32 = 276;
const PCAP_HEADER_LEN: usize = 24;
const RECORD_HEADER_LEN: usize = 16;
const SLL2_HEADER_LEN: usize = 20;

/// How a pcap file writes its numbers and times.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PcapFormat {
    big_endian: bool,
    nanos: bool,
}

impl PcapFormat {
    fn u32_at(self, b: &[u8], at: usize) -> u32 {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if self.big_endian {
            u32::from_be_bytes(w)
        } else {
            u32::from_le_bytes(w)
        }
    }
}

/// One captured frame, its cooked header read.
#[derive(Debug, PartialEq)]
struct Record<'a> {
    at: f64,
    ifindex: u32,
    /// Ethertype of the payload.
    protocol: u16,
    /// From the network header on.
    payload: &'a [u8],
}

/// The file's format and where its records start.
fn pcap_header(data: &[u8]) -> Result<(PcapFormat, usize), String> {
    if data.len() < PCAP_HEADER_LEN {
        return Err("the capture file has no pcap header".into());
    }
    let magic = [data[0], data[1], data[2], data[3]];
    let format = match (u32::from_le_bytes(magic), u32::from_be_bytes(magic)) {
        (0xa1b2_c3d4, _) => (false, false),
        (0xa1b2_3c4d, _) => (false, true),
        (_, 0xa1b2_c3d4) => (true, false),
        (_, 0xa1b2_3c4d) => (true, true),
        _ => return Err("the capture file is not a pcap file".into()),
    };
    let format = PcapFormat {
        big_endian: format.0,
        nanos: format.1,
    };
    let linktype = format.u32_at(data, 20) & 0x0fff_ffff;
    if linktype != LINKTYPE_LINUX_SLL2 {
        return Err(format!(
            "the capture has link type {linktype}, not LINUX_SLL2 ({LINKTYPE_LINUX_SLL2})"
        ));
    }
    Ok((format, PCAP_HEADER_LEN))
}

/// The complete records from `start` on, and where the first incomplete
/// one (still being written) starts. Records too short for a cooked
/// header are skipped.
fn pcap_records(data: &[u8], format: PcapFormat, start: usize) -> (Vec<Record<'_>>, usize) {
    let mut records = Vec::new();
    let mut at = start;
    while data.len() >= at + RECORD_HEADER_LEN {
        let secs = format.u32_at(data, at);
        let frac = format.u32_at(data, at + 4);
        let len = format.u32_at(data, at + 8) as usize;
        let body = at + RECORD_HEADER_LEN;
        let Some(frame) = data.get(body..body + len) else {
            break;
        };
        at = body + len;
        if frame.len() < SLL2_HEADER_LEN {
            continue;
        }
        let divisor = if format.nanos { 1e9 } else { 1e6 };
        records.push(Record {
            at: f64::from(secs) + f64::from(frac) / divisor,
            protocol: u16::from_be_bytes([frame[0], frame[1]]),
            ifindex: u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]),
            payload: &frame[SLL2_HEADER_LEN..],
        });
    }
    (records, at)
}

/// Reads a pcap file as tcpdump writes it, the new records only.
#[derive(Default)]
struct Tail {
    format: Option<PcapFormat>,
    /// File offset of the first record not read yet.
    offset: u64,
    buffer: Vec<u8>,
}

impl Tail {
    /// Records appended since the last call (none until the header is in).
    fn read_new(&mut self, path: &std::path::Path) -> Result<Vec<Record<'_>>, LabError> {
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        self.buffer.clear();
        file.read_to_end(&mut self.buffer)?;
        let mut start = 0;
        let format = match self.format {
            Some(f) => f,
            None if self.buffer.len() < PCAP_HEADER_LEN => return Ok(Vec::new()),
            None => {
                let (f, header_len) = pcap_header(&self.buffer).map_err(LabError::Watch)?;
                self.format = Some(f);
                start = header_len;
                f
            }
        };
        let (records, end) = pcap_records(&self.buffer, format, start);
        self.offset += end as u64;
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(secs: u32, usecs: u32, ifindex: u32, protocol: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = protocol.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(&ifindex.to_be_bytes());
        frame.extend_from_slice(&[0, 1, 0, 6, 2, 0, 0, 0, 0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        let mut out = Vec::new();
        for field in [secs, usecs, frame.len() as u32, frame.len() as u32] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        out.extend_from_slice(&frame);
        out
    }

    fn pcap(records: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for field in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 96, LINKTYPE_LINUX_SLL2] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        for r in records {
            out.extend_from_slice(r);
        }
        out
    }

    fn ipv4(src: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&[198, 18, 2, 1]);
        p
    }

    fn arp(sender: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0, 1, 8, 0, 6, 4, 0, 2, 2, 0, 0, 0, 0, 1];
        p.extend_from_slice(&sender.octets());
        p.extend_from_slice(&[0xff; 6]);
        p.extend_from_slice(&[198, 18, 2, 1]);
        p
    }

    fn na(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 32, 58, 255];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&"ff02::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[136, 0, 0, 0, 0xa0, 0, 0, 0]);
        p.extend_from_slice(&target.octets());
        p
    }

    #[test]
    fn frames_are_classified_by_what_speaks_for_the_address() {
        let v4 = Ipv4Addr::new(198, 18, 100, 9);
        let v6: Ipv6Addr = "fd00:198:18::100:9".parse().unwrap();
        let other4 = Ipv4Addr::new(198, 18, 1, 1);
        let other6: Ipv6Addr = "fe80::1".parse().unwrap();
        let addrs = [IpAddr::V4(v4), IpAddr::V6(v6)];
        assert_eq!(classify(0x0800, &ipv4(v4), &addrs), Some((v4.into(), "ip")));
        assert_eq!(classify(0x0800, &ipv4(other4), &addrs), None);
        assert_eq!(classify(0x0806, &arp(v4), &addrs), Some((v4.into(), "arp")));
        assert_eq!(classify(0x0806, &arp(other4), &addrs), None);
        assert_eq!(
            classify(0x86dd, &na(other6, v6), &addrs),
            Some((v6.into(), "na"))
        );
        assert_eq!(
            classify(0x86dd, &na(v6, v6), &addrs),
            Some((v6.into(), "na"))
        );
        assert_eq!(
            classify(0x86dd, &na(v6, other6), &addrs),
            Some((v6.into(), "ip"))
        );
        assert_eq!(classify(0x86dd, &na(other6, other6), &addrs), None);
        // Truncated frames are ignored, not read past their end.
        assert_eq!(classify(0x0806, &arp(v4)[..15], &addrs), None);
        assert_eq!(classify(0x0800, &ipv4(v4)[..12], &addrs), None);
    }

    #[test]
    fn a_pcap_file_reads_back_and_a_partial_record_waits() {
        let data = pcap(&[
            record(10, 500_000, 7, 0x0800, &ipv4(Ipv4Addr::new(1, 2, 3, 4))),
            record(11, 250_000, 8, 0x0806, &arp(Ipv4Addr::new(1, 2, 3, 4))),
        ]);
        let (format, start) = pcap_header(&data).unwrap();
        let (records, end) = pcap_records(&data, format, start);
        assert_eq!(end, data.len());
        assert_eq!(records.len(), 2);
        assert_eq!(
            (records[0].at, records[0].ifindex, records[0].protocol),
            (10.5, 7, 0x0800)
        );
        assert_eq!(
            (records[1].at, records[1].ifindex, records[1].protocol),
            (11.25, 8, 0x0806)
        );
        let cut = data.len() - 3;
        let (records, end) = pcap_records(&data[..cut], format, start);
        assert_eq!(records.len(), 1);
        assert!(end < cut);
        let mut wrong = data.clone();
        wrong[20] = 1;
        assert!(pcap_header(&wrong).unwrap_err().contains("LINUX_SLL2"));
        assert!(pcap_header(b"not a pcap file at all!!!").is_err());
    }

    #[test]
    fn markers_are_recognised() {
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1,
        ];
        p.extend_from_slice(&[0x80, 0, 0, 9, 0, 0, 0, 0]);
        p.extend_from_slice(MARKER_TAG);
        p.extend_from_slice(b"42");
        let r = Record {
            at: 0.0,
            ifindex: 1,
            protocol: 0x0800,
            payload: &p,
        };
        assert_eq!(marker_seq(&r), Some(42));
        let mut other_port = p.clone();
        other_port[23] = 10;
        let r = Record {
            payload: &other_port,
            ..r
        };
        assert_eq!(marker_seq(&r), None);
    }

    #[test]
    fn the_filter_matches_a_neighbour_advertisement_target() {
        let f = filter(&["fd00:198:18::100:9".parse().unwrap()]);
        assert!(f.contains("ip6[48:4] = 0xfd000198"), "{f}");
        assert!(f.contains("ip6[60:4] = 0x01000009"), "{f}");
        let f = filter(&["198.18.100.9".parse().unwrap()]);
        assert!(f.contains("(arp src host 198.18.100.9)"), "{f}");
    }
}
