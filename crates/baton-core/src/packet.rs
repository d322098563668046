//! Client segments as the capture path hands them up: a raw IPv4 or IPv6
//! packet (no link layer), checked and turned into a typed [`Segment`].
//!
//! The check decides what may enter the log, so it is strict where the
//! kernel would drop the packet anyway and never stricter than the kernel's
//! TCP on anything a real client sends: a packet refused here is dropped,
//! never proposed, and the client retransmits it.
//!
//! Super-packets (GRO on receive, or a local sender's TSO through a veth)
//! reach NFQUEUE whole when the queue asks for them (`NFQA_CFG_F_GSO`):
//! longer than the MTU, lengths exact, but with a TCP checksum field that
//! holds only the pseudo-header sum. The caller therefore says, from the
//! packet's `NFQA_SKB_INFO` flags, whether the kernel will check the TCP
//! checksum itself ([`TcpChecksum::from_skb_info`]); lengths and the IPv4
//! header checksum are always checked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::checksum::Sum16BitWords;
use etherparse::err::{ip::HeaderError, ip::HeadersError, ip::SliceError};
use etherparse::{
    ip_number, IpNumber, IpSlice, Ipv4Header, Ipv6FlowLabel, Ipv6Header, LenSource, TcpHeader,
    TcpOptionElement, TcpOptionReadError, TcpOptionsIterator, TcpSlice,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// `NFQA_SKB_INFO` flag: the checksum is left to hardware or to the local
/// stack (`CHECKSUM_PARTIAL`); the field holds the pseudo-header sum only.
pub const NFQA_SKB_CSUMNOTREADY: u32 = 1 << 0;
/// `NFQA_SKB_INFO` flag: an aggregated super-packet, longer than the MTU.
pub const NFQA_SKB_GSO: u32 = 1 << 1;
/// `NFQA_SKB_INFO` flag: nobody has verified the checksum yet.
pub const NFQA_SKB_CSUM_NOTVERIFIED: u32 = 1 << 2;

/// One TCP connection, seen from the service: the client's address and
/// port, and ours (the VIP's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnKey {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// The TCP header's flag bits (the low eight; the AE/NS bit is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const PSH: TcpFlags = TcpFlags(0x08);
    pub const ACK: TcpFlags = TcpFlags(0x10);
    pub const URG: TcpFlags = TcpFlags(0x20);
    pub const ECE: TcpFlags = TcpFlags(0x40);
    pub const CWR: TcpFlags = TcpFlags(0x80);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

/// A TCP timestamp option (RFC 7323).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Timestamp {
    pub tsval: u32,
    pub tsecr: u32,
}

/// Most SACK blocks a TCP header can carry (40 option bytes).
pub const MAX_SACK_BLOCKS: usize = 4;

/// The options baton needs, decoded. Options of other kinds (MPTCP, TFO,
/// MD5, experimental) are skipped by their length, as the kernel does;
/// the last copy of a repeated option wins, as in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpOptions {
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    pub timestamp: Option<Timestamp>,
    sack: [(u32, u32); MAX_SACK_BLOCKS],
    sack_len: u8,
}

impl TcpOptions {
    /// The SACK blocks (start, end), in the order the sender wrote them.
    pub fn sack(&self) -> &[(u32, u32)] {
        &self.sack[..usize::from(self.sack_len)]
    }
}

/// A validated client segment. `payload` borrows from the packet, so
/// parsing copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Source is the client: the capture path only sees client → VIP.
    pub conn: ConnKey,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    /// As on the wire; scaling depends on the connection's handshake.
    pub window: u16,
    pub urgent: u16,
    pub options: TcpOptions,
    pub payload: &'a [u8],
}

impl Segment<'_> {
    /// Sequence space the segment occupies: payload, plus one each for SYN
    /// and FIN.
    pub fn seq_len(&self) -> u32 {
        // A payload fits in an IP packet, far below 2^32.
        self.payload.len() as u32
            + u32::from(self.flags.contains(TcpFlags::SYN))
            + u32::from(self.flags.contains(TcpFlags::FIN))
    }

    /// Sequence number just after the segment (TCP's `end_seq`).
    pub fn end_seq(&self) -> u32 {
        self.seq.wrapping_add(self.seq_len())
    }
}

/// Whether the TCP checksum is to be checked here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpChecksum {
    /// Check it: nobody has (a packet from a NIC without checksum offload,
    /// or from anywhere that is not NFQUEUE).
    Verify,
    /// Skip it, because the kernel's TCP will skip it too: a device already
    /// verified it, or the packet is `CHECKSUM_PARTIAL` (merged by GRO or
    /// sent by a local stack) and its field holds a partial sum. Checking
    /// would refuse packets that the kernel accepts.
    Trusted,
}

impl TcpChecksum {
    /// From the packet's `NFQA_SKB_INFO` flags (0 when the attribute is
    /// absent, which the kernel does when there is nothing to say: the
    /// checksum was verified).
    pub fn from_skb_info(flags: u32) -> TcpChecksum {
        if flags & NFQA_SKB_CSUMNOTREADY != 0 {
            TcpChecksum::Trusted
        } else if flags & NFQA_SKB_CSUM_NOTVERIFIED != 0 {
            TcpChecksum::Verify
        } else {
            TcpChecksum::Trusted
        }
    }
}

/// Why a packet is not a valid client segment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    IpVersion(u8),
    #[error("IPv4 header length {ihl} (in words) is below the minimum of 5")]
    Ipv4HeaderLength { ihl: u8 },
    /// The buffer is shorter than the headers' length fields say: a
    /// truncated copy (NFQUEUE copy range) or a lying header.
    #[error("truncated: {needed} bytes needed, {got} present")]
    Truncated { needed: usize, got: usize },
    /// A length field is inconsistent with the headers it must contain.
    #[error("IP length field {field} cannot hold the headers")]
    BadLength { field: usize },
    /// Bytes beyond the IP length: the kernel trims link padding before
    /// the hook, so these are not from NFQUEUE.
    #[error("{extra} bytes beyond the IP packet's length")]
    TrailingBytes { extra: usize },
    /// IPv6 payload length 0 (jumbogram or BIG TCP): not supported.
    #[error("IPv6 payload length 0 (jumbogram) is not supported")]
    Jumbogram,
    #[error("IPv4 header checksum mismatch")]
    Ipv4Checksum,
    #[error("malformed IP extension header")]
    BadExtension,
    /// A fragment: TCP cannot be checked before reassembly.
    #[error("IP fragment")]
    Fragment,
    #[error("IP protocol {0} is not TCP")]
    NotTcp(u8),
    #[error("TCP data offset {0} (in words) is below the minimum of 5")]
    TcpDataOffset(u8),
    #[error("TCP header of {header} bytes does not fit in a segment of {segment}")]
    TcpHeaderTooLong { header: usize, segment: usize },
    #[error("TCP checksum mismatch")]
    TcpChecksum,
    #[error("malformed TCP option of kind {kind}")]
    TcpOption { kind: u8 },
}

/// Parses and validates one raw IP packet carrying a client's TCP segment.
pub fn parse(packet: &[u8], checksum: TcpChecksum) -> Result<Segment<'_>, PacketError> {
    if packet.is_empty() {
        return Err(PacketError::Empty);
    }
    let ip = IpSlice::from_slice(packet).map_err(ip_error)?;
    let (src, dst): (IpAddr, IpAddr);
    let ip_payload = ip.payload();
    match &ip {
        IpSlice::Ipv4(v4) => {
            let header = v4.header();
            let total = usize::from(header.total_len());
            if packet.len() > total {
                return Err(PacketError::TrailingBytes {
                    extra: packet.len() - total,
                });
            }
            if Sum16BitWords::new()
                .add_slice(header.slice())
                .ones_complement()
                != 0
            {
                return Err(PacketError::Ipv4Checksum);
            }
            src = IpAddr::V4(header.source_addr());
            dst = IpAddr::V4(header.destination_addr());
        }
        IpSlice::Ipv6(v6) => {
            let header = v6.header();
            if ip_payload.len_source != LenSource::Ipv6HeaderPayloadLen {
                return Err(PacketError::Jumbogram);
            }
            let total = Ipv6Header::LEN + usize::from(header.payload_length());
            if packet.len() > total {
                return Err(PacketError::TrailingBytes {
                    extra: packet.len() - total,
                });
            }
            src = IpAddr::V6(header.source_addr());
            dst = IpAddr::V6(header.destination_addr());
        }
    }
    if ip_payload.fragmented {
        return Err(PacketError::Fragment);
    }
    if ip_payload.ip_number != ip_number::TCP {
        return Err(PacketError::NotTcp(ip_payload.ip_number.0));
    }
    let bytes = ip_payload.payload;
    let tcp = TcpSlice::from_slice(bytes).map_err(|e| tcp_error(e, bytes))?;
    if checksum == TcpChecksum::Verify && !tcp_checksum_ok(src, dst, bytes) {
        return Err(PacketError::TcpChecksum);
    }
    let options = parse_options(tcp.options())?;
    Ok(Segment {
        conn: ConnKey {
            client: SocketAddr::new(src, tcp.source_port()),
            server: SocketAddr::new(dst, tcp.destination_port()),
        },
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        // Byte 13 of the header holds CWR..FIN.
        flags: TcpFlags(tcp.header_slice()[13]),
        window: tcp.window_size(),
        urgent: tcp.urgent_pointer(),
        options,
        payload: tcp.payload(),
    })
}

fn ip_error(e: SliceError) -> PacketError {
    match e {
        SliceError::Len(len) => match len.len_source {
            LenSource::Slice => PacketError::Truncated {
                needed: len.required_len,
                got: len.len,
            },
            _ => PacketError::BadLength { field: len.len },
        },
        SliceError::IpHeaders(HeadersError::Ip(HeaderError::UnsupportedIpVersion {
            version_number,
        })) => PacketError::IpVersion(version_number),
        SliceError::IpHeaders(HeadersError::Ip(
            HeaderError::Ipv4HeaderLengthSmallerThanHeader { ihl },
        )) => PacketError::Ipv4HeaderLength { ihl },
        SliceError::IpHeaders(HeadersError::Ipv4Ext(_) | HeadersError::Ipv6Ext(_)) => {
            PacketError::BadExtension
        }
    }
}

fn tcp_error(e: etherparse::err::tcp::HeaderSliceError, bytes: &[u8]) -> PacketError {
    use etherparse::err::tcp::{HeaderError, HeaderSliceError};
    match e {
        HeaderSliceError::Len(len) if len.required_len <= TcpHeader::MIN_LEN => {
            PacketError::Truncated {
                needed: len.required_len,
                got: len.len,
            }
        }
        HeaderSliceError::Len(len) => PacketError::TcpHeaderTooLong {
            header: len.required_len,
            segment: bytes.len(),
        },
        HeaderSliceError::Content(HeaderError::DataOffsetTooSmall { data_offset }) => {
            PacketError::TcpDataOffset(data_offset)
        }
    }
}

/// The one's-complement sum over pseudo-header and segment, checksum field
/// included, must be all ones; both encodings of zero pass, as in the
/// kernel.
fn tcp_checksum_ok(src: IpAddr, dst: IpAddr, segment: &[u8]) -> bool {
    let mut sum = Sum16BitWords::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // The IPv4 total length bounds the segment below 2^16.
            sum = sum
                .add_4bytes(s.octets())
                .add_4bytes(d.octets())
                .add_2bytes([0, ip_number::TCP.0])
                .add_2bytes((segment.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            sum = sum
                .add_16bytes(s.octets())
                .add_16bytes(d.octets())
                .add_4bytes((segment.len() as u32).to_be_bytes())
                .add_4bytes([0, 0, 0, ip_number::TCP.0]);
        }
        _ => return false,
    }
    sum.add_slice(segment).ones_complement() == 0
}

fn parse_options(mut rest: &[u8]) -> Result<TcpOptions, PacketError> {
    let mut out = TcpOptions::default();
    loop {
        let mut it = TcpOptionsIterator::from_slice(rest);
        match it.next() {
            None => return Ok(out),
            Some(Ok(element)) => {
                rest = it.rest();
                match element {
                    TcpOptionElement::Noop => {}
                    TcpOptionElement::MaximumSegmentSize(mss) => out.mss = Some(mss),
                    TcpOptionElement::WindowScale(w) => out.wscale = Some(w),
                    TcpOptionElement::SelectiveAcknowledgementPermitted => {
                        out.sack_permitted = true
                    }
                    TcpOptionElement::SelectiveAcknowledgement(first, more) => {
                        out.sack[0] = first;
                        let mut n = 1;
                        for block in more.into_iter().flatten() {
                            out.sack[n] = block;
                            n += 1;
                        }
                        out.sack_len = n as u8;
                    }
                    TcpOptionElement::Timestamp(tsval, tsecr) => {
                        out.timestamp = Some(Timestamp { tsval, tsecr })
                    }
                }
            }
            Some(Err(TcpOptionReadError::UnknownId(kind))) => {
                // Kinds we do not use are skipped by their length field.
                let len = rest.get(1).map_or(0, |l| usize::from(*l));
                if len < 2 || len > rest.len() {
                    return Err(PacketError::TcpOption { kind });
                }
                rest = &rest[len..];
            }
            Some(Err(
                TcpOptionReadError::UnexpectedSize { option_id, .. }
                | TcpOptionReadError::UnexpectedEndOfSlice { option_id, .. },
            )) => return Err(PacketError::TcpOption { kind: option_id }),
        }
    }
}

/// Makes valid client packets for tests (and for anything that injects
/// segments): `Builder::new(conn).seq(..).ack(..).payload(..).build()`.
#[derive(Debug, Clone)]
pub struct Builder {
    conn: ConnKey,
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    window: u16,
    urgent: u16,
    options: Vec<TcpOptionElement>,
    raw_options: Option<Vec<u8>>,
    payload: Vec<u8>,
    partial_checksum: bool,
}

impl Builder {
    /// A segment from `conn.client` to `conn.server`; both addresses must
    /// be of one family.
    pub fn new(conn: ConnKey) -> Builder {
        Builder {
            conn,
            seq: 0,
            ack: 0,
            flags: TcpFlags::default(),
            window: 65535,
            urgent: 0,
            options: Vec::new(),
            raw_options: None,
            payload: Vec::new(),
            partial_checksum: false,
        }
    }

    pub fn seq(mut self, seq: u32) -> Builder {
        self.seq = seq;
        self
    }

    /// Sets the acknowledgment number and the ACK flag.
    pub fn ack(mut self, ack: u32) -> Builder {
        self.ack = ack;
        self.flags = self.flags | TcpFlags::ACK;
        self
    }

    /// Adds flags to those already set.
    pub fn flags(mut self, flags: TcpFlags) -> Builder {
        self.flags = self.flags | flags;
        self
    }

    pub fn window(mut self, window: u16) -> Builder {
        self.window = window;
        self
    }

    pub fn urgent(mut self, urgent: u16) -> Builder {
        self.urgent = urgent;
        self.flags = self.flags | TcpFlags::URG;
        self
    }

    pub fn mss(mut self, mss: u16) -> Builder {
        self.options.push(TcpOptionElement::MaximumSegmentSize(mss));
        self
    }

    pub fn wscale(mut self, wscale: u8) -> Builder {
        self.options.push(TcpOptionElement::Noop);
        self.options.push(TcpOptionElement::WindowScale(wscale));
        self
    }

    pub fn sack_permitted(mut self) -> Builder {
        self.options
            .push(TcpOptionElement::SelectiveAcknowledgementPermitted);
        self
    }

    /// Up to [`MAX_SACK_BLOCKS`] blocks; more do not fit a header.
    pub fn sack(mut self, blocks: &[(u32, u32)]) -> Builder {
        if let Some((&first, more)) = blocks.split_first() {
            let mut rest = [None; 3];
            for (slot, block) in rest.iter_mut().zip(more) {
                *slot = Some(*block);
            }
            self.options.push(TcpOptionElement::Noop);
            self.options.push(TcpOptionElement::Noop);
            self.options
                .push(TcpOptionElement::SelectiveAcknowledgement(first, rest));
        }
        self
    }

    pub fn timestamp(mut self, tsval: u32, tsecr: u32) -> Builder {
        self.options.push(TcpOptionElement::Noop);
        self.options.push(TcpOptionElement::Noop);
        self.options.push(TcpOptionElement::Timestamp(tsval, tsecr));
        self
    }

    /// Option bytes as given (padded to a word with zeros), replacing any
    /// option set above: for options of other kinds and malformed ones.
    pub fn raw_options(mut self, bytes: &[u8]) -> Builder {
        self.raw_options = Some(bytes.to_vec());
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Builder {
        self.payload = payload.to_vec();
        self
    }

    /// Writes only the pseudo-header sum in the checksum field, as a
    /// `CHECKSUM_PARTIAL` packet has it.
    pub fn partial_checksum(mut self) -> Builder {
        self.partial_checksum = true;
        self
    }

    /// The packet, IP header first.
    ///
    /// # Panics
    /// If the addresses are of two families, the options exceed 40 bytes or
    /// the payload does not fit one IP packet: mistakes of the caller, not
    /// of any input.
    pub fn build(&self) -> Vec<u8> {
        let f = self.flags;
        let mut tcp = TcpHeader::new(
            self.conn.client.port(),
            self.conn.server.port(),
            self.seq,
            self.window,
        );
        tcp.acknowledgment_number = self.ack;
        tcp.fin = f.contains(TcpFlags::FIN);
        tcp.syn = f.contains(TcpFlags::SYN);
        tcp.rst = f.contains(TcpFlags::RST);
        tcp.psh = f.contains(TcpFlags::PSH);
        tcp.ack = f.contains(TcpFlags::ACK);
        tcp.urg = f.contains(TcpFlags::URG);
        tcp.ece = f.contains(TcpFlags::ECE);
        tcp.cwr = f.contains(TcpFlags::CWR);
        tcp.urgent_pointer = self.urgent;
        match &self.raw_options {
            Some(raw) => tcp.set_options_raw(raw),
            None => tcp.set_options(&self.options),
        }
        .expect("TCP options exceed 40 bytes");
        let tcp_len = tcp.header_len() + self.payload.len();
        let mut out = Vec::with_capacity(60 + tcp_len);
        match (self.conn.client.ip(), self.conn.server.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = Ipv4Header::new(
                    u16::try_from(tcp_len).expect("segment too long for IPv4"),
                    64,
                    IpNumber::TCP,
                    s.octets(),
                    d.octets(),
                )
                .expect("segment too long for IPv4");
                ip.header_checksum = ip.calc_header_checksum();
                tcp.checksum = if self.partial_checksum {
                    partial_sum(v4_pseudo(s, d, tcp_len))
                } else {
                    tcp.calc_checksum_ipv4(&ip, &self.payload)
                        .expect("segment too long for IPv4")
                };
                out.extend_from_slice(&ip.to_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: u16::try_from(tcp_len).expect("segment too long for IPv6"),
                    next_header: IpNumber::TCP,
                    hop_limit: 64,
                    source: s.octets(),
                    destination: d.octets(),
                };
                tcp.checksum = if self.partial_checksum {
                    partial_sum(v6_pseudo(s, d, tcp_len))
                } else {
                    tcp.calc_checksum_ipv6(&ip, &self.payload)
                        .expect("segment too long for IPv6")
                };
                out.extend_from_slice(&ip.to_bytes());
            }
            _ => panic!("client and server addresses of two IP families"),
        }
        out.extend_from_slice(&tcp.to_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

fn v4_pseudo(s: Ipv4Addr, d: Ipv4Addr, len: usize) -> Sum16BitWords {
    Sum16BitWords::new()
        .add_4bytes(s.octets())
        .add_4bytes(d.octets())
        .add_2bytes([0, ip_number::TCP.0])
        .add_2bytes((len as u16).to_be_bytes())
}

fn v6_pseudo(s: Ipv6Addr, d: Ipv6Addr, len: usize) -> Sum16BitWords {
    Sum16BitWords::new()
        .add_16bytes(s.octets())
        .add_16bytes(d.octets())
        .add_4bytes((len as u32).to_be_bytes())
        .add_4bytes([0, 0, 0, ip_number::TCP.0])
}

/// The folded, uncomplemented sum: what the kernel leaves in the field of a
/// `CHECKSUM_PARTIAL` packet for the device to finish.
fn partial_sum(sum: Sum16BitWords) -> u16 {
    // The sum is kept in native-endian words; the header wants the value.
    (!sum.ones_complement()).to_be()
}

#[cfg(test)]
mod tests;
