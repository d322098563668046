//! `Echo`: sends every byte back; when the peer finishes, finishes too.

use std::net::SocketAddr;

use baton_core::service::{CloseReason, ConnId, Context, RestoreError, Service};

/// The echo service. It keeps no state: every byte is answered at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Echo;

impl Service for Echo {
    fn on_open(&mut self, _ctx: &mut Context, _conn: ConnId, _peer: SocketAddr) {}

    fn on_data(&mut self, ctx: &mut Context, conn: ConnId, data: &[u8]) {
        ctx.send(conn, data);
    }

    fn on_close(&mut self, ctx: &mut Context, conn: ConnId, reason: CloseReason) {
        match reason {
            // Everything was echoed already: finish our side too.
            CloseReason::PeerFinished => ctx.shutdown_write(conn),
            CloseReason::Reset => {}
        }
    }

    fn checkpoint(&self) -> Vec<u8> {
        Vec::new()
    }

    fn restore(bytes: &[u8]) -> Result<Echo, RestoreError> {
        if bytes.is_empty() {
            Ok(Echo)
        } else {
            Err(RestoreError::new(format!(
                "echo keeps no state, but its checkpoint has {} bytes",
                bytes.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::log::{Applier, Event, LogEntry};
    use baton_core::service::Output;

    #[test]
    fn echoes_then_finishes() {
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let events = [
            Event::Opened { conn: 7, peer },
            Event::Data {
                conn: 7,
                bytes: b"hello".to_vec(),
            },
            Event::Data {
                conn: 7,
                bytes: Vec::new(),
            },
            Event::Closed {
                conn: 7,
                reason: CloseReason::PeerFinished,
            },
            Event::Closed {
                conn: 8,
                reason: CloseReason::Reset,
            },
        ];
        let mut echo = Echo;
        let mut applier = Applier::default();
        let outs: Vec<Vec<Output>> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| {
                let entry = LogEntry {
                    index: i as u64 + 1,
                    time_ms: 1000,
                    entropy: 0,
                    event,
                };
                applier.apply(&mut echo, &entry).unwrap()
            })
            .collect();
        assert_eq!(
            outs,
            vec![
                vec![],
                vec![Output::Send {
                    conn: 7,
                    bytes: b"hello".to_vec()
                }],
                vec![],
                vec![Output::ShutdownWrite { conn: 7 }],
                vec![],
            ]
        );
    }

    #[test]
    fn checkpoint_is_empty() {
        assert!(Echo.checkpoint().is_empty());
        assert_eq!(Echo::restore(&[]), Ok(Echo));
        assert!(Echo::restore(&[0]).is_err());
    }
}
