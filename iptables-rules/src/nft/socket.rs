//! The NETLINK_NETFILTER socket: sending a transaction and collecting its ACKs, dumping objects,
//! and closing off the caller's path.
//!
//! A socket belongs to the netns it was created in, so it must be opened on a thread inside the
//! target netns; it can be used and closed from anywhere afterwards. Closing a netfilter netlink
//! socket can take milliseconds (the kernel tears down per-socket nf_tables state), so [`NftSocket`]'s
//! drop hands the fd to a background reaper thread instead of closing it inline.

use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use netlink_sys::Socket;

use super::attr::{Msg, Msgs, Writer};
use super::batch::Batch;
use super::consts::*;

/// How long to wait for the kernel's answer before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer; large enough for any single dump datagram the kernel builds (it caps them at 32 KiB).
const RECV_BUF: usize = 64 * 1024;
/// `NLM_F_DUMP_INTR`: the dump saw a concurrent change and must be redone.
const NLM_F_DUMP_INTR: u16 = 0x10;

/// Errors from the nf_tables netlink layer; each names the object or operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// A socket call failed.
    #[error("nf_tables netlink socket: {op}: {source}")]
    Socket {
        /// Which call.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel rejected one object of a transaction (the whole transaction was rolled back).
    #[error("nf_tables: {object}: {source}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Object {
        /// The object, as an nft command (e.g. `add rule inet istio-ambient-nat istio-output`).
        object: String,
        /// The errno.
        source: std::io::Error,
        /// The kernel's extended-ACK message, if it gave one.
        detail: Option<String>,
    },
    /// The kernel failed the transaction as a whole (commit phase) or a request.
    #[error("nf_tables: {what}: {source}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Request {
        /// What was asked.
        what: String,
        /// The errno.
        source: std::io::Error,
        /// The kernel's extended-ACK message, if any.
        detail: Option<String>,
    },
    /// The kernel's reply was not understood.
    #[error("nf_tables: {what}: malformed or unexpected reply")]
    Protocol {
        /// What was asked.
        what: String,
    },
}

impl NftError {
    /// The errno the kernel returned, if this is a kernel rejection.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Object { source, .. }
            | Self::Request { source, .. }
            | Self::Socket { source, .. } => source.raw_os_error(),
            Self::Protocol { .. } => None,
        }
    }
}

/// An open NETLINK_NETFILTER socket in the netns it was created in.
#[derive(Debug)]
pub struct NftSocket {
    sock: Option<Socket>,
    seq: u32,
    buf: Vec<u8>,
}

impl NftSocket {
    /// Opens a socket in the calling thread's current netns.
    pub fn open() -> Result<Self, NftError> {
        let sock = Socket::new(NETLINK_NETFILTER).map_err(|source| NftError::Socket {
            op: "socket",
            source,
        })?;
        let fd = std::os::fd::AsFd::as_fd(&sock);
        let tv = nix::sys::time::TimeVal::new(REPLY_TIMEOUT.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).map_err(
            |e| NftError::Socket {
                op: "setsockopt(SO_RCVTIMEO)",
                source: e.into(),
            },
        )?;
        // CAP_ACK: errors do not echo our whole request back; EXT_ACK: they carry the kernel's reason.
        sock.set_cap_ack(true).map_err(|source| NftError::Socket {
            op: "setsockopt(NETLINK_CAP_ACK)",
            source,
        })?;
        sock.set_ext_ack(true).map_err(|source| NftError::Socket {
            op: "setsockopt(NETLINK_EXT_ACK)",
            source,
        })?;
        // Start sequence numbers away from 0 so stray replies to other users of seq 0 never match.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() | 1)
            .unwrap_or(1);
        Ok(Self {
            sock: Some(sock),
            seq,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Closes the socket on the calling thread (drop hands it to the background reaper instead).
    pub fn close_now(mut self) {
        drop(self.sock.take());
    }

    fn sock(&self) -> &Socket {
        // Only `Drop` takes the socket out.
        self.sock.as_ref().expect("socket present until drop")
    }

    fn next_seq(&mut self, n: u32) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n.max(1));
        s
    }

    /// Sends a transaction and waits for the kernel's verdict on every object in it. On error
    /// nothing of the transaction is applied (the kernel aborts it whole); the error names the
    /// first object the kernel rejected.
    pub fn commit(&mut self, batch: Batch) -> Result<(), NftError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (mut bytes, msgs) = batch.finish();
        let n = msgs.len() as u32;
        let base = self.next_seq(n + 2);
        // Patch sequence numbers: BATCH_BEGIN = base, objects base+1.., BATCH_END = base+n+1.
        bytes[8..12].copy_from_slice(&base.to_ne_bytes());
        for (i, (start, _)) in msgs.iter().enumerate() {
            bytes[start + 8..start + 12].copy_from_slice(&(base + 1 + i as u32).to_ne_bytes());
        }
        let end = bytes.len() - 20;
        bytes[end + 8..end + 12].copy_from_slice(&(base + n + 1).to_ne_bytes());
        if bytes.len() > 128 * 1024 {
            // Large transactions (many set elements) need a bigger send buffer than the default.
            let fd = std::os::fd::AsFd::as_fd(self.sock());
            let _ = nix::sys::socket::setsockopt(
                &fd,
                nix::sys::socket::sockopt::SndBufForce,
                &(bytes.len() * 2),
            );
        }
        if msgs.len() > 64 {
            // One ACK datagram per object (~1 KiB of buffer accounting each): make room for all
            // of them, or the kernel drops ACKs (ENOBUFS) and we would wait for ones never sent.
            let fd = std::os::fd::AsFd::as_fd(self.sock());
            let _ = nix::sys::socket::setsockopt(
                &fd,
                nix::sys::socket::sockopt::RcvBufForce,
                &(msgs.len() * 2048),
            );
        }
        self.sock()
            .send(&bytes, 0)
            .map_err(|source| NftError::Socket { op: "send", source })?;

        let mut answered = vec![false; msgs.len()];
        let mut pending = msgs.len();
        let mut first_err: Option<(usize, i32, Option<String>)> = None;
        let mut commit_err: Option<(i32, Option<String>)> = None;
        while pending > 0 {
            let len = self.recv("transaction reply")?;
            for m in Msgs(&self.buf[..len]) {
                if m.ty != NLMSG_ERROR {
                    continue;
                }
                let (errno, detail) = parse_error(&m).ok_or_else(|| NftError::Protocol {
                    what: "transaction reply".into(),
                })?;
                let seq = m.seq;
                if seq == base || seq == base + n + 1 {
                    // The commit itself failed after every object was accepted.
                    if errno != 0 {
                        commit_err.get_or_insert((errno, detail));
                    }
                    continue;
                }
                let Some(i) = seq
                    .checked_sub(base + 1)
                    .map(|i| i as usize)
                    .filter(|&i| i < msgs.len())
                else {
                    continue; // not ours (stale reply from an earlier, timed-out request)
                };
                if !answered[i] {
                    answered[i] = true;
                    pending -= 1;
                }
                if errno != 0 && first_err.as_ref().is_none_or(|(j, _, _)| i < *j) {
                    first_err = Some((i, errno, detail));
                }
            }
            if commit_err.is_some() && pending > 0 && first_err.is_none() {
                // A commit failure may be the only answer we get; do not wait for ACKs that were dropped.
                break;
            }
        }
        if let Some((i, errno, detail)) = first_err {
            return Err(NftError::Object {
                object: msgs[i].1.clone(),
                source: std::io::Error::from_raw_os_error(errno),
                detail,
            });
        }
        if let Some((errno, detail)) = commit_err {
            return Err(NftError::Request {
                what: format!("commit of a {n}-object transaction"),
                source: std::io::Error::from_raw_os_error(errno),
                detail,
            });
        }
        Ok(())
    }

    /// Dumps all objects of one kind (`NFT_MSG_GET*` with `NLM_F_DUMP`), optionally filtered by
    /// family and attributes (e.g. table name). Returns each reply message's attribute bytes.
    pub fn dump(
        &mut self,
        msg_type: u16,
        family: u8,
        filter: &[(u16, &str)],
        what: &str,
    ) -> Result<Vec<Vec<u8>>, NftError> {
        for _ in 0..3 {
            let mut w = Writer::default();
            let seq = self.next_seq(1);
            let m = w.begin_msg(
                (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
                family,
                0,
            );
            for (ty, s) in filter {
                w.attr_str(*ty, s);
            }
            w.end_msg(m);
            self.sock()
                .send(w.bytes(), 0)
                .map_err(|source| NftError::Socket { op: "send", source })?;
            let mut out = Vec::new();
            let mut interrupted = false;
            'recv: loop {
                let len = self.recv(what)?;
                for m in Msgs(&self.buf[..len]) {
                    if m.seq != seq {
                        continue;
                    }
                    if m.flags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    match m.ty {
                        NLMSG_DONE => break 'recv,
                        NLMSG_ERROR => {
                            let (errno, detail) = parse_error(&m)
                                .ok_or_else(|| NftError::Protocol { what: what.into() })?;
                            if errno == 0 {
                                break 'recv;
                            }
                            return Err(NftError::Request {
                                what: what.into(),
                                source: std::io::Error::from_raw_os_error(errno),
                                detail,
                            });
                        }
                        _ => out.push(m.body.get(4..).unwrap_or(&[]).to_vec()),
                    }
                }
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(NftError::Protocol {
            what: format!("{what}: dump kept being interrupted by concurrent changes"),
        })
    }

    /// Sends one non-dump `NFT_MSG_GET*` request (`build` writes its attributes) and returns the
    /// attribute bytes of the reply messages up to the kernel's ACK; a kernel error is
    /// [`NftError::Request`] (e.g. `ENOENT` for an absent object).
    pub(crate) fn get(
        &mut self,
        msg_type: u16,
        family: u8,
        build: impl FnOnce(&mut Writer),
        what: &str,
    ) -> Result<Vec<Vec<u8>>, NftError> {
        let mut w = Writer::default();
        let seq = self.next_seq(1);
        let m = w.begin_msg(
            (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family,
            0,
        );
        build(&mut w);
        w.end_msg(m);
        self.sock()
            .send(w.bytes(), 0)
            .map_err(|source| NftError::Socket { op: "send", source })?;
        let mut out = Vec::new();
        loop {
            let len = self.recv(what)?;
            for m in Msgs(&self.buf[..len]) {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_ERROR => {
                        let (errno, detail) = parse_error(&m)
                            .ok_or_else(|| NftError::Protocol { what: what.into() })?;
                        if errno == 0 {
                            return Ok(out);
                        }
                        return Err(NftError::Request {
                            what: what.into(),
                            source: std::io::Error::from_raw_os_error(errno),
                            detail,
                        });
                    }
                    NLMSG_DONE => return Ok(out),
                    _ => out.push(m.body.get(4..).unwrap_or(&[]).to_vec()),
                }
            }
        }
    }

    fn recv(&mut self, what: &str) -> Result<usize, NftError> {
        let sock = self
            .sock
            .as_ref()
            .ok_or_else(|| NftError::Protocol { what: what.into() })?;
        loop {
            match sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(NftError::Socket {
                        op: "recv (no reply from the kernel in time)",
                        source: e,
                    })
                }
                Err(source) => return Err(NftError::Socket { op: "recv", source }),
            }
        }
    }
}

impl Drop for NftSocket {
    fn drop(&mut self) {
        if let Some(s) = self.sock.take() {
            reap(s);
        }
    }
}

/// Parses an `NLMSG_ERROR` body: errno (positive; 0 = ACK) and the extended-ACK message.
fn parse_error(m: &Msg<'_>) -> Option<(i32, Option<String>)> {
    let err = i32::from_ne_bytes(m.body.get(..4)?.try_into().ok()?);
    let mut detail = None;
    if m.flags & NLM_F_ACK_TLVS != 0 {
        // With NETLINK_CAP_ACK the echoed request is just its 16-byte header; TLVs follow.
        let echoed_len = NLMSG_HDRLEN;
        if let Some(tlvs) = m.body.get(4 + echoed_len..) {
            detail = super::attr::Attrs(tlvs)
                .find(|a| a.ty == NLMSGERR_ATTR_MSG)
                .and_then(|a| a.str().map(str::to_owned));
        }
    }
    Some((-err, detail))
}

/// Closes sockets on a background thread, off the pod's critical path.
fn reap(sock: Socket) {
    static REAPER: OnceLock<Option<mpsc::Sender<Socket>>> = OnceLock::new();
    let tx = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Socket>();
        std::thread::Builder::new()
            .name("nft-socket-reaper".into())
            .spawn(move || {
                // SCHED_IDLE: waking the reaper never preempts the thread that just applied
                // rules; closes happen in spare CPU time. Best effort (keeps normal policy on error).
                // The raw syscall: musl's sched_setscheduler() is a stub (ENOSYS), and its
                // sched_param has more fields than glibc's, hence zeroed.
                // SAFETY: sched_param is plain data (all-zero is valid); pid 0 means the
                // calling thread; the kernel only reads the struct.
                unsafe {
                    let param: libc::sched_param = std::mem::zeroed();
                    libc::syscall(
                        libc::SYS_sched_setscheduler,
                        0,
                        libc::SCHED_IDLE,
                        &param as *const libc::sched_param,
                    );
                }
                for s in rx {
                    drop(s);
                }
            })
            .ok()
            .map(|_| tx)
    });
    match tx {
        Some(tx) => {
            if let Err(mpsc::SendError(s)) = tx.send(sock) {
                drop(s);
            }
        }
        None => drop(sock),
    }
}
