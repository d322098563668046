use super::*;
use proptest::prelude::*;

fn v4() -> ConnKey {
    ConnKey {
        client: "198.18.2.1:40000".parse().unwrap(),
        server: "198.18.0.10:6379".parse().unwrap(),
    }
}

fn v6() -> ConnKey {
    ConnKey {
        client: "[fd00::2:1]:40000".parse().unwrap(),
        server: "[fd00::10]:6379".parse().unwrap(),
    }
}

fn full(conn: ConnKey) -> Builder {
    Builder::new(conn)
        .seq(0xffff_fff0)
        .ack(77)
        .flags(TcpFlags::PSH)
        .window(512)
        .timestamp(1000, 2000)
        .sack(&[(10, 20), (30, 40), (50, 60)])
        .payload(b"hello, world")
}

/// Recomputes the IPv4 header checksum after a test edited the header, so
/// that the edit, not the checksum, is what the parser sees.
fn fix_ipv4_checksum(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0xf) * 4;
    p[10] = 0;
    p[11] = 0;
    // The sum is kept in native-endian words.
    let sum = Sum16BitWords::new().add_slice(&p[..ihl]).ones_complement();
    p[10..12].copy_from_slice(&sum.to_ne_bytes());
}

#[test]
fn round_trip_v4_and_v6() {
    for conn in [v4(), v6()] {
        let p = full(conn).build();
        let s = parse(&p, TcpChecksum::Verify).unwrap();
        assert_eq!(s.conn, conn);
        assert_eq!(s.seq, 0xffff_fff0);
        assert_eq!(s.ack, 77);
        assert_eq!(s.flags, TcpFlags::ACK | TcpFlags::PSH);
        assert_eq!(s.window, 512);
        assert_eq!(
            s.options.timestamp,
            Some(Timestamp {
                tsval: 1000,
                tsecr: 2000
            })
        );
        assert_eq!(s.options.sack(), &[(10, 20), (30, 40), (50, 60)]);
        assert_eq!(s.payload, b"hello, world");
        assert_eq!(s.seq_len(), 12);
        assert_eq!(s.end_seq(), 0xffff_fff0u32.wrapping_add(12));
    }
}

#[test]
fn syn_options() {
    for conn in [v4(), v6()] {
        let p = Builder::new(conn)
            .seq(5)
            .flags(TcpFlags::SYN)
            .mss(1460)
            .sack_permitted()
            .timestamp(1, 0)
            .wscale(7)
            .build();
        let s = parse(&p, TcpChecksum::Verify).unwrap();
        assert_eq!(s.flags, TcpFlags::SYN);
        assert_eq!(s.options.mss, Some(1460));
        assert_eq!(s.options.wscale, Some(7));
        assert!(s.options.sack_permitted);
        assert_eq!(s.seq_len(), 1);
    }
}

#[test]
fn unknown_options_are_skipped_by_length() {
    // MPTCP (30, length 4), then a timestamp, then an experimental (254, 2).
    let raw = [30, 4, 0, 0, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3, 254, 2];
    let p = Builder::new(v4()).ack(1).raw_options(&raw).build();
    let s = parse(&p, TcpChecksum::Verify).unwrap();
    assert_eq!(s.options.timestamp, Some(Timestamp { tsval: 9, tsecr: 3 }));
}

#[test]
fn malformed_options_are_refused() {
    for (raw, kind) in [
        (&[2u8, 3, 5, 0][..], 2),                        // MSS of length 3
        (&[8, 10, 0, 0][..], 8),                         // timestamp cut short
        (&[30, 0, 0, 0][..], 30),                        // unknown kind, length 0 (would loop)
        (&[30, 1, 0, 0][..], 30),                        // unknown kind, length 1
        (&[30, 9, 0, 0][..], 30),                        // unknown kind, past the header
        (&[5, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..], 5), // SACK of length 11
    ] {
        let p = Builder::new(v4()).ack(1).raw_options(raw).build();
        assert_eq!(
            parse(&p, TcpChecksum::Verify),
            Err(PacketError::TcpOption { kind }),
            "{raw:?}"
        );
    }
    // End of options stops the walk: what follows is padding.
    let p = Builder::new(v4())
        .ack(1)
        .raw_options(&[0, 30, 0, 0])
        .build();
    assert!(parse(&p, TcpChecksum::Verify).is_ok());
}

#[test]
fn tcp_checksum_checked_only_when_asked() {
    for conn in [v4(), v6()] {
        let mut p = full(conn).build();
        let last = p.len() - 1;
        p[last] ^= 0x40;
        assert_eq!(
            parse(&p, TcpChecksum::Verify),
            Err(PacketError::TcpChecksum)
        );
        assert_eq!(
            parse(&p, TcpChecksum::Trusted).unwrap().payload[11],
            b'd' ^ 0x40
        );
    }
}

#[test]
fn partial_checksum_packets_pass_when_trusted() {
    for conn in [v4(), v6()] {
        let p = full(conn).partial_checksum().build();
        assert_eq!(
            parse(&p, TcpChecksum::Verify),
            Err(PacketError::TcpChecksum)
        );
        let s = parse(
            &p,
            TcpChecksum::from_skb_info(NFQA_SKB_CSUMNOTREADY | NFQA_SKB_GSO),
        )
        .unwrap();
        assert_eq!(s.payload, b"hello, world");
        // Finish the sum as a device would (over the segment, the partial
        // field included): the packet then checks.
        let mut q = p.clone();
        let off = if conn.client.is_ipv4() { 20 } else { 40 };
        let sum = Sum16BitWords::new().add_slice(&q[off..]).ones_complement();
        q[off + 16..off + 18].copy_from_slice(&sum.to_ne_bytes());
        assert!(parse(&q, TcpChecksum::Verify).is_ok());
    }
}

#[test]
fn skb_info_mapping() {
    assert_eq!(TcpChecksum::from_skb_info(0), TcpChecksum::Trusted);
    assert_eq!(
        TcpChecksum::from_skb_info(NFQA_SKB_CSUM_NOTVERIFIED),
        TcpChecksum::Verify
    );
    assert_eq!(
        TcpChecksum::from_skb_info(NFQA_SKB_CSUM_NOTVERIFIED | NFQA_SKB_GSO),
        TcpChecksum::Verify
    );
    assert_eq!(
        TcpChecksum::from_skb_info(NFQA_SKB_CSUMNOTREADY),
        TcpChecksum::Trusted
    );
}

#[test]
fn super_packets_longer_than_any_mtu_parse() {
    let payload = vec![7u8; 60_000];
    for conn in [v4(), v6()] {
        let p = Builder::new(conn)
            .seq(1)
            .ack(2)
            .payload(&payload)
            .partial_checksum()
            .build();
        let s = parse(&p, TcpChecksum::Trusted).unwrap();
        assert_eq!(s.payload.len(), 60_000);
    }
}

#[test]
fn ipv4_header_checksum() {
    let mut p = full(v4()).build();
    p[8] = 1; // TTL changed, checksum not
    assert_eq!(
        parse(&p, TcpChecksum::Trusted),
        Err(PacketError::Ipv4Checksum)
    );
}

#[test]
fn lengths() {
    for conn in [v4(), v6()] {
        let p = full(conn).build();
        let short = &p[..p.len() - 1];
        assert!(matches!(
            parse(short, TcpChecksum::Trusted),
            Err(PacketError::Truncated { .. })
        ));
        let mut long = p.clone();
        long.push(0);
        assert_eq!(
            parse(&long, TcpChecksum::Trusted),
            Err(PacketError::TrailingBytes { extra: 1 })
        );
        assert!(matches!(
            parse(&p[..10], TcpChecksum::Trusted),
            Err(PacketError::Truncated { .. })
        ));
    }
    assert_eq!(parse(&[], TcpChecksum::Trusted), Err(PacketError::Empty));

    // IPv4 total length below the header's own length.
    let mut p = full(v4()).build();
    p[2..4].copy_from_slice(&10u16.to_be_bytes());
    fix_ipv4_checksum(&mut p);
    assert_eq!(
        parse(&p, TcpChecksum::Trusted),
        Err(PacketError::BadLength { field: 10 })
    );

    // IPv6 payload length 0 with bytes behind it.
    let mut p = full(v6()).build();
    p[4] = 0;
    p[5] = 0;
    assert_eq!(parse(&p, TcpChecksum::Trusted), Err(PacketError::Jumbogram));

    // IP length shorter than a TCP header.
    let mut p = Builder::new(v4()).ack(1).build();
    p[2..4].copy_from_slice(&30u16.to_be_bytes());
    p.truncate(30);
    fix_ipv4_checksum(&mut p);
    assert!(matches!(
        parse(&p, TcpChecksum::Trusted),
        Err(PacketError::Truncated {
            needed: 20,
            got: 10
        })
    ));
}

#[test]
fn ip_header_fields() {
    let mut p = full(v4()).build();
    p[0] = 0x55;
    assert_eq!(
        parse(&p, TcpChecksum::Trusted),
        Err(PacketError::IpVersion(5))
    );

    let mut p = full(v4()).build();
    p[0] = 0x44;
    assert_eq!(
        parse(&p, TcpChecksum::Trusted),
        Err(PacketError::Ipv4HeaderLength { ihl: 4 })
    );

    let mut p = full(v4()).build();
    p[9] = 17;
    fix_ipv4_checksum(&mut p);
    assert_eq!(
        parse(&p, TcpChecksum::Trusted),
        Err(PacketError::NotTcp(17))
    );

    let mut p = full(v6()).build();
    p[6] = 17;
    assert_eq!(
        parse(&p, TcpChecksum::Trusted),
        Err(PacketError::NotTcp(17))
    );

    // More-fragments bit.
    let mut p = full(v4()).build();
    p[6] |= 0x20;
    fix_ipv4_checksum(&mut p);
    assert_eq!(parse(&p, TcpChecksum::Trusted), Err(PacketError::Fragment));

    // A later fragment (offset 8 bytes).
    let mut p = full(v4()).build();
    p[6] = 0;
    p[7] = 1;
    fix_ipv4_checksum(&mut p);
    assert_eq!(parse(&p, TcpChecksum::Trusted), Err(PacketError::Fragment));
}

#[test]
fn ipv4_options_are_allowed() {
    // Rebuild a packet with one word of IPv4 options (NOP NOP NOP EOL).
    let p = full(v4()).build();
    let mut q = Vec::new();
    q.extend_from_slice(&p[..20]);
    q.extend_from_slice(&[1, 1, 1, 0]);
    q.extend_from_slice(&p[20..]);
    q[0] = 0x46;
    let total = q.len() as u16;
    q[2..4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut q);
    let s = parse(&q, TcpChecksum::Verify).unwrap();
    assert_eq!(s.payload, b"hello, world");
}

#[test]
fn tcp_data_offset() {
    for conn in [v4(), v6()] {
        let ip_len = if conn.client.is_ipv4() { 20 } else { 40 };
        let mut p = full(conn).build();
        p[ip_len + 12] = 4 << 4;
        assert_eq!(
            parse(&p, TcpChecksum::Trusted),
            Err(PacketError::TcpDataOffset(4))
        );
        let mut p = Builder::new(conn).ack(1).payload(b"abc").build();
        p[ip_len + 12] = 15 << 4;
        assert_eq!(
            parse(&p, TcpChecksum::Trusted),
            Err(PacketError::TcpHeaderTooLong {
                header: 60,
                segment: 23
            })
        );
    }
}

#[test]
fn urgent_pointer_and_flags() {
    let p = Builder::new(v4())
        .ack(1)
        .urgent(3)
        .flags(TcpFlags::FIN | TcpFlags::ECE | TcpFlags::CWR)
        .payload(b"abc")
        .build();
    let s = parse(&p, TcpChecksum::Verify).unwrap();
    assert_eq!(s.urgent, 3);
    assert!(s
        .flags
        .contains(TcpFlags::URG | TcpFlags::FIN | TcpFlags::ACK));
    assert!(s.flags.contains(TcpFlags::ECE | TcpFlags::CWR));
    assert!(!s.flags.contains(TcpFlags::SYN));
    assert_eq!(s.seq_len(), 4);
}

fn any_valid_packet() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        any::<u32>(),
        any::<u32>(),
        any::<u8>(),
        any::<u16>(),
        proptest::option::of((any::<u32>(), any::<u32>())),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(six, seq, ack, flags, window, ts, payload)| {
            let mut b = Builder::new(if six { v6() } else { v4() })
                .seq(seq)
                .ack(ack)
                .flags(TcpFlags(flags))
                .window(window)
                .payload(&payload);
            if let Some((tsval, tsecr)) = ts {
                b = b.timestamp(tsval, tsecr);
            }
            b.build()
        })
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), first in any::<u8>()) {
        let mut bytes = bytes;
        // Make the version nibble plausible half of the time, so the parser
        // gets past the first byte.
        if first & 1 == 0 && !bytes.is_empty() {
            bytes[0] = if first & 2 == 0 { 0x45 } else { 0x60 };
        }
        let _ = parse(&bytes, TcpChecksum::Verify);
        let _ = parse(&bytes, TcpChecksum::Trusted);
    }

    #[test]
    fn mutated_packets_never_panic(
        p in any_valid_packet(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
        fix in any::<bool>(),
    ) {
        let mut p = p;
        for (at, byte) in edits {
            let at = at % p.len();
            p[at] = byte;
        }
        if fix && p[0] >> 4 == 4 && usize::from(p[0] & 0xf) * 4 <= p.len() && p[0] & 0xf >= 5 {
            fix_ipv4_checksum(&mut p);
        }
        let cut = cut % (p.len() + 1);
        let _ = parse(&p[..cut], TcpChecksum::Verify);
        let _ = parse(&p, TcpChecksum::Verify);
        let _ = parse(&p, TcpChecksum::Trusted);
    }

    #[test]
    fn valid_packets_parse_to_what_was_built(
        six in any::<bool>(),
        seq in any::<u32>(),
        ack in any::<u32>(),
        flags in any::<u8>(),
        window in any::<u16>(),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let conn = if six { v6() } else { v4() };
        let p = Builder::new(conn).seq(seq).ack(ack).flags(TcpFlags(flags)).window(window).payload(&payload).build();
        let s = parse(&p, TcpChecksum::Verify).unwrap();
        prop_assert_eq!(s.conn, conn);
        prop_assert_eq!(s.seq, seq);
        prop_assert_eq!(s.ack, ack);
        prop_assert_eq!(s.flags, TcpFlags(flags) | TcpFlags::ACK);
        prop_assert_eq!(s.window, window);
        prop_assert_eq!(s.payload, &payload[..]);
    }

    /// A single flipped bit anywhere in a valid packet is caught (by the IP
    /// or TCP checksum, or a length or field check) or changes nothing the
    /// checksums cover twice (e.g. the IPv4 TTL pair); it never yields a
    /// segment with different content.
    #[test]
    fn single_bit_flips_do_not_slip_through(p in any_valid_packet(), bit in any::<usize>()) {
        let good = parse(&p, TcpChecksum::Verify).unwrap();
        let mut q = p.clone();
        let bit = bit % (q.len() * 8);
        q[bit / 8] ^= 1 << (bit % 8);
        if let Ok(s) = parse(&q, TcpChecksum::Verify) {
            // Only fields outside both checksums can differ: IPv6 traffic
            // class, flow label and hop limit.
            prop_assert!(good.conn.client.is_ipv6());
            prop_assert!(bit / 8 < 8 && bit / 8 != 4 && bit / 8 != 5 && bit / 8 != 6);
            prop_assert_eq!(s, good);
        }
    }
}
