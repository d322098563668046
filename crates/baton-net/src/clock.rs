//! The host's monotonic clock as a number, for deadlines that two
//! processes share: the daemon tells its keeper when a lease ends, and
//! both read the same CLOCK_MONOTONIC (`Instant` cannot be sent).

/// Microseconds of CLOCK_MONOTONIC (since boot, not counting suspend).
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_moves_forward_with_instant() {
        let a = super::monotonic_us();
        let t = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = super::monotonic_us();
        assert!(b >= a + 5_000 && b - a <= t.elapsed().as_micros() as u64 + 1_000);
    }
}
