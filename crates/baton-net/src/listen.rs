//! Listening sockets for services.

use std::net::{SocketAddr, TcpListener};

/// Listens on `addr` even where that address is not (yet) local
/// (IP_FREEBIND), so a node that takes a VIP accepts new connections to it
/// at once, with no listener to set up during a move.
pub fn listen_freebind(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_freebind(true)?;
    } else {
        socket.set_freebind_ipv6(true)?;
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Makes the socket's close a reset (SO_LINGER 0): what a service that
/// gives up on a connection sends, instead of a FIN that says "all done".
pub fn reset_on_close(fd: std::os::fd::BorrowedFd) -> std::io::Result<()> {
    socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO))
}
