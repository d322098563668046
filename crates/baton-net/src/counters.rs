//! TCP counters of a host's stack, to prove that no connection was reset.

use std::collections::HashMap;

/// Reset and abort counters of one network namespace
/// (`/proc/net/netstat`, `/proc/net/snmp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// `Tcp: OutRsts`: resets this stack sent.
    pub out_rsts: u64,
    /// `Tcp: EstabResets`: established connections that were reset.
    pub estab_resets: u64,
    /// `Tcp: AttemptFails`: connects that failed (refused, reset).
    pub attempt_fails: u64,
    /// Sum of `TcpExt: TCPAbortOn*` and `TCPAbortFailed`: connections aborted.
    pub aborts: u64,
    /// `TcpExt: PAWSEstab`: segments of established connections dropped
    /// because their timestamp was older than one seen before (a move that
    /// let a timestamp go backwards).
    pub paws_estab: u64,
}

/// Every counter of `/proc/net/snmp` and `/proc/net/netstat` of the calling
/// thread's network namespace, as `Prefix:Name` (`Tcp:OutRsts`). The
/// thread's, not the process's: `/proc/net` follows the main thread.
pub fn snapshot() -> std::io::Result<HashMap<String, u64>> {
    let mut all = parse(&std::fs::read_to_string("/proc/thread-self/net/snmp")?);
    all.extend(parse(&std::fs::read_to_string(
        "/proc/thread-self/net/netstat",
    )?));
    Ok(all)
}

impl TcpCounters {
    /// Reads the counters of the calling thread's network namespace.
    pub fn read_current() -> std::io::Result<TcpCounters> {
        let all = snapshot()?;
        let get = |key: &str| all.get(key).copied().unwrap_or(0);
        Ok(TcpCounters {
            out_rsts: get("Tcp:OutRsts"),
            estab_resets: get("Tcp:EstabResets"),
            attempt_fails: get("Tcp:AttemptFails"),
            aborts: all
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("TcpExt:TCPAbortOn") || *k == "TcpExt:TCPAbortFailed"
                })
                .map(|(_, v)| *v)
                .sum(),
            paws_estab: get("TcpExt:PAWSEstab"),
        })
    }

    /// How many resets and aborts happened between `earlier` and `self`.
    pub fn resets_since(&self, earlier: &TcpCounters) -> u64 {
        (self.out_rsts - earlier.out_rsts.min(self.out_rsts))
            + (self.estab_resets - earlier.estab_resets.min(self.estab_resets))
            + (self.aborts - earlier.aborts.min(self.aborts))
    }

    /// How many segments PAWS dropped between `earlier` and `self`.
    pub fn paws_drops_since(&self, earlier: &TcpCounters) -> u64 {
        self.paws_estab.saturating_sub(earlier.paws_estab)
    }
}

/// Parses the header/value line pairs of /proc/net/snmp and netstat into
/// `Prefix:Name -> value`.
fn parse(text: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let mut names = names.split_whitespace();
        let mut values = values.split_whitespace();
        let (Some(prefix), Some(_)) = (names.next(), values.next()) else {
            continue;
        };
        for (name, value) in names.zip(values) {
            if let Ok(v) = value.parse::<i64>() {
                out.insert(format!("{prefix}{name}"), v.max(0) as u64);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_tables() {
        let t = parse("Tcp: RtoAlgorithm OutRsts EstabResets\nTcp: 1 7 2\nTcpExt: TCPAbortOnData TCPAbortOnClose\nTcpExt: 3 4\n");
        assert_eq!(t["Tcp:OutRsts"], 7);
        assert_eq!(t["TcpExt:TCPAbortOnClose"], 4);
    }
}
