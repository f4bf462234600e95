//! Netlink message and attribute (TLV) encoding and decoding, by hand: the nf_tables wire format
//! is a few fixed headers plus nested `nlattr`s, simpler to write directly than to model.

use super::consts::*;

/// Rounds up to the 4-byte netlink alignment.
pub(crate) const fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends netlink messages and attributes to one buffer (a batch or a single request).
#[derive(Debug, Default, Clone)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Starts a message: `nlmsghdr` + `nfgenmsg`; returns its start for [`Writer::end_msg`].
    pub(crate) fn begin_msg(
        &mut self,
        ty: u16,
        flags: u16,
        seq: u32,
        family: u8,
        res_id: u16,
    ) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in end_msg
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        self.buf.push(family);
        self.buf.push(NFNETLINK_V0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    /// Patches the message length.
    pub(crate) fn end_msg(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Appends one attribute with a raw payload, padded.
    pub(crate) fn attr(&mut self, ty: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    /// A NUL-terminated string attribute.
    pub(crate) fn attr_str(&mut self, ty: u16, s: &str) {
        let len = 4 + s.len() + 1;
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    /// A big-endian u32 attribute (nf_tables' integers are network order).
    pub(crate) fn attr_be32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// Opens a nested attribute; returns its start for [`Writer::end_nest`].
    pub(crate) fn begin_nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub(crate) fn end_nest(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        let n = align(self.buf.len()) - self.buf.len();
        self.buf.extend(std::iter::repeat_n(0u8, n));
    }
}

/// One attribute read back: type without flag bits, and its payload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attr<'a> {
    pub(crate) ty: u16,
    pub(crate) payload: &'a [u8],
}

impl<'a> Attr<'a> {
    /// Payload as a big-endian u32, if it is 4 bytes.
    pub(crate) fn be32(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.payload.get(..4)?.try_into().ok()?))
    }

    /// Payload as a NUL-terminated (or plain) string.
    pub(crate) fn str(&self) -> Option<&'a str> {
        let end = self
            .payload
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.payload.len());
        std::str::from_utf8(&self.payload[..end]).ok()
    }

    /// Iterates the nested attributes inside this one.
    pub(crate) fn nested(&self) -> Attrs<'a> {
        Attrs(self.payload)
    }
}

/// Iterator over a run of attributes; stops at the first malformed one.
#[derive(Debug, Clone)]
pub(crate) struct Attrs<'a>(pub(crate) &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;
    fn next(&mut self) -> Option<Attr<'a>> {
        let b = self.0;
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            self.0 = &[];
            return None;
        }
        let payload = &b[4..len];
        self.0 = b.get(align(len)..).unwrap_or(&[]);
        Some(Attr { ty, payload })
    }
}

/// A netlink message read back: header fields and the body after `nlmsghdr`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg<'a> {
    pub(crate) ty: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    pub(crate) body: &'a [u8],
}

impl<'a> Msg<'a> {
    /// Attributes after the `nfgenmsg` header (nf_tables messages).
    #[cfg(test)]
    pub(crate) fn nft_attrs(&self) -> Attrs<'a> {
        Attrs(self.body.get(4..).unwrap_or(&[]))
    }

    /// `nfgenmsg.nfgen_family`.
    #[cfg(test)]
    pub(crate) fn family(&self) -> u8 {
        self.body.first().copied().unwrap_or(0)
    }
}

/// Iterator over the netlink messages in one datagram.
#[derive(Debug, Clone)]
pub(crate) struct Msgs<'a>(pub(crate) &'a [u8]);

impl<'a> Iterator for Msgs<'a> {
    type Item = Msg<'a>;
    fn next(&mut self) -> Option<Msg<'a>> {
        let b = self.0;
        if b.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            self.0 = &[];
            return None;
        }
        let msg = Msg {
            ty: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            body: &b[NLMSG_HDRLEN..len],
        };
        self.0 = b.get(align(len)..).unwrap_or(&[]);
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_round_trip_with_padding_and_nesting() {
        let mut w = Writer::default();
        let m = w.begin_msg(0x0a00, NLM_F_REQUEST, 7, NFPROTO_INET, 0);
        w.attr_str(1, "istio-ambient-nat");
        let n = w.begin_nest(4);
        w.attr_be32(1, 3);
        w.attr(2, &[1, 2, 3]);
        w.end_nest(n);
        w.end_msg(m);
        let bytes = w.into_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let msgs: Vec<_> = Msgs(&bytes).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].seq, 7);
        assert_eq!(msgs[0].family(), NFPROTO_INET);
        let attrs: Vec<_> = msgs[0].nft_attrs().collect();
        assert_eq!(attrs[0].str(), Some("istio-ambient-nat"));
        assert_eq!(attrs[1].ty, 4);
        let inner: Vec<_> = attrs[1].nested().collect();
        assert_eq!(inner[0].be32(), Some(3));
        assert_eq!(inner[1].payload, &[1, 2, 3]);
    }

    #[test]
    fn truncated_input_stops_iteration() {
        assert_eq!(Attrs(&[8, 0, 1]).count(), 0);
        assert_eq!(Attrs(&[40, 0, 1, 0, 0, 0, 0, 0]).count(), 0);
        assert_eq!(Msgs(&[0u8; 15]).count(), 0);
    }
}
