//! Hearing writes to one netns's nf_tables ruleset and routing policy: two netlink sockets
//! subscribed to the kernel's change notifications. Anything they receive is a write, ours or
//! another's. The agent's drift verifier uses them to verify a pod at once; tests use them to
//! show that a read-only pass wrote nothing.

use std::io;

use netlink_sys::{protocols, Socket, SocketAddr};

/// `NFNLGRP_NFTABLES` (linux/netfilter/nfnetlink.h); iptables-nft writes through it too.
const NFNLGRP_NFTABLES: u32 = 7;
/// The route and policy-rule groups of both families.
const RT_GROUPS: [u32; 4] = [
    libc::RTNLGRP_IPV4_ROUTE,
    libc::RTNLGRP_IPV4_RULE,
    libc::RTNLGRP_IPV6_ROUTE,
    libc::RTNLGRP_IPV6_RULE,
];

/// The two non-blocking listeners of the netns they were opened in.
#[derive(Debug)]
pub struct KernelWrites {
    /// nf_tables changes.
    pub nf: Socket,
    /// Route and policy-rule changes.
    pub rt: Socket,
}

impl KernelWrites {
    /// Opens both in the calling thread's netns (enter the pod's first: a netlink socket
    /// stays bound to the netns it was created in); `rcvbuf` bounds what queues up.
    pub fn open_here(rcvbuf: Option<usize>) -> io::Result<Self> {
        Ok(Self {
            nf: subscribe(protocols::NETLINK_NETFILTER, &[NFNLGRP_NFTABLES], rcvbuf)?,
            rt: subscribe(protocols::NETLINK_ROUTE, &RT_GROUPS, rcvbuf)?,
        })
    }

    /// Reads and discards everything queued on both; whether anything was heard.
    pub fn drain(&self) -> io::Result<bool> {
        Ok(drain(&self.nf)? | drain(&self.rt)?)
    }
}

/// A non-blocking netlink socket of `proto` that joined `groups`.
fn subscribe(proto: isize, groups: &[u32], rcvbuf: Option<usize>) -> io::Result<Socket> {
    let mut s = Socket::new(proto)?;
    s.bind(&SocketAddr::new(0, 0))?;
    for g in groups {
        s.add_membership(*g)?;
    }
    if let Some(n) = rcvbuf {
        s.set_rx_buf_sz(n)?;
    }
    s.set_non_blocking(true)?;
    Ok(s)
}

/// Reads and discards everything queued on `s`; whether anything (or an overrun) was heard.
pub fn drain(s: &Socket) -> io::Result<bool> {
    let mut buf = [0u8; 256];
    let mut heard = false;
    loop {
        // MSG_TRUNC: a longer message is discarded whole, never split over reads.
        match s.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Ok(_) => heard = true,
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(heard),
                Some(libc::EINTR) => {}
                // Messages were dropped: something changed, and the queue is empty again.
                Some(libc::ENOBUFS) => heard = true,
                _ => return Err(e),
            },
        }
    }
}
