//! A minimal rtnetlink client: the three dumps and three requests the agent needs.
//!
//! Hand-rolled on a raw `NETLINK_ROUTE` socket so that neither side of the kexec needs `ip`
//! and the binary carries no netlink crate. Integers are in host byte order, addresses in
//! network byte order, exactly as the kernel's uapi headers lay them out.

use anyhow::{bail, Context, Result};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Kernel ABI numbers from `linux/netlink.h`, `linux/rtnetlink.h`, `linux/if_link.h`,
/// `linux/if_addr.h`. Kept here rather than taken from `libc` so the musl build does not
/// depend on which of them a libc release exports; a test compares them with `libc`.
pub mod consts {
    pub const NLMSG_HDRLEN: usize = 16;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const NLMSG_OVERRUN: u16 = 4;

    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_MULTI: u16 = 0x2;
    pub const NLM_F_ACK: u16 = 0x4;
    pub const NLM_F_DUMP_INTR: u16 = 0x10;
    pub const NLM_F_DUMP: u16 = 0x300;
    pub const NLM_F_REPLACE: u16 = 0x100;
    pub const NLM_F_EXCL: u16 = 0x200;
    pub const NLM_F_CREATE: u16 = 0x400;
    /// On an error message: the request was not echoed back in full.
    pub const NLM_F_CAPPED: u16 = 0x100;
    /// On an error message: extended-ack attributes follow.
    pub const NLM_F_ACK_TLVS: u16 = 0x200;
    pub const NLMSGERR_ATTR_MSG: u16 = 1;

    pub const SOL_NETLINK: i32 = 270;
    pub const NETLINK_EXT_ACK: i32 = 11;

    pub const RTM_NEWLINK: u16 = 16;
    pub const RTM_GETLINK: u16 = 18;
    pub const RTM_NEWADDR: u16 = 20;
    pub const RTM_GETADDR: u16 = 22;
    pub const RTM_NEWROUTE: u16 = 24;
    pub const RTM_GETROUTE: u16 = 26;

    pub const IFLA_ADDRESS: u16 = 1;
    pub const IFLA_IFNAME: u16 = 3;
    pub const IFLA_MTU: u16 = 4;
    pub const IFLA_MASTER: u16 = 10;
    pub const IFLA_LINKINFO: u16 = 18;
    pub const IFLA_INFO_KIND: u16 = 1;
    pub const IFLA_EXT_MASK: u16 = 29;
    pub const IFLA_PROP_LIST: u16 = 52;
    pub const IFLA_ALT_IFNAME: u16 = 53;
    pub const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

    pub const IFA_ADDRESS: u16 = 1;
    pub const IFA_LOCAL: u16 = 2;
    pub const IFA_CACHEINFO: u16 = 6;
    pub const IFA_FLAGS: u16 = 8;
    pub const IFA_F_NODAD: u32 = 0x02;
    pub const IFA_F_TENTATIVE: u32 = 0x40;
    pub const IFA_F_PERMANENT: u32 = 0x80;
    pub const INFINITY_LIFE_TIME: u32 = 0xFFFF_FFFF;

    pub const RTA_DST: u16 = 1;
    pub const RTA_OIF: u16 = 4;
    pub const RTA_GATEWAY: u16 = 5;
    pub const RTA_PRIORITY: u16 = 6;
    pub const RTA_MULTIPATH: u16 = 9;
    pub const RTA_TABLE: u16 = 15;
    pub const RTA_VIA: u16 = 18;

    pub const RTN_UNICAST: u8 = 1;
    pub const RT_TABLE_MAIN: u8 = 254;
    pub const RTNH_F_ONLINK: u32 = 4;
    pub const RTM_F_CLONED: u32 = 0x200;

    pub const IFF_UP: u32 = 0x1;
    pub const IFF_LOOPBACK: u32 = 0x8;
    pub const ARPHRD_LOOPBACK: u16 = 772;

    pub const AF_INET: u8 = 2;
    pub const AF_INET6: u8 = 10;
}

use consts::*;

/// Pads a length to the 4-byte boundary netlink aligns messages and attributes to.
pub fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Builds one request message: header, a fixed family struct, then attributes.
pub struct Builder {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Builder {
    pub fn new(kind: u16, flags: u16) -> Builder {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Builder {
            buf,
            nests: Vec::new(),
        }
    }

    /// The family-specific struct (`ifinfomsg`, `ifaddrmsg`, `rtmsg`).
    pub fn fixed(mut self, bytes: &[u8]) -> Builder {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    pub fn attr(mut self, kind: u16, payload: &[u8]) -> Builder {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    pub fn attr_u32(self, kind: u16, value: u32) -> Builder {
        self.attr(kind, &value.to_ne_bytes())
    }

    pub fn attr_str(self, kind: u16, text: &str) -> Builder {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes)
    }

    pub fn attr_ip(self, kind: u16, ip: IpAddr) -> Builder {
        self.attr(kind, &ip_bytes(ip))
    }

    pub fn begin_nested(mut self, kind: u16) -> Builder {
        self.nests.push(self.buf.len());
        // The kernel wants NLA_F_NESTED on nests it parses strictly (e.g. IFLA_LINKINFO).
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | 0x8000).to_ne_bytes());
        self
    }

    pub fn end_nested(mut self) -> Builder {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        while self.nests.last().is_some() {
            self = self.end_nested();
        }
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }

    fn pad(&mut self) {
        let padded = align(self.buf.len());
        self.buf.resize(padded, 0);
    }
}

pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

/// An address attribute as the kernel sends it; `None` for a length that fits no family.
pub fn parse_ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// `struct rtvia`: a gateway that may be of another family than the route (RFC 5549).
pub fn parse_via(bytes: &[u8]) -> Option<IpAddr> {
    let family = u16::from_ne_bytes(bytes.get(0..2)?.try_into().ok()?);
    let ip = parse_ip(bytes.get(2..)?)?;
    (family_of(ip) as u16 == family).then_some(ip)
}

pub fn via_bytes(ip: IpAddr) -> Vec<u8> {
    let mut bytes = (family_of(ip) as u16).to_ne_bytes().to_vec();
    bytes.extend(ip_bytes(ip));
    bytes
}

pub fn u32_of(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(0..4)?.try_into().ok()?))
}

/// A NUL-terminated string attribute.
pub fn str_of(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// `struct ifinfomsg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfInfo {
    pub family: u8,
    pub link_type: u16,
    pub index: i32,
    pub flags: u32,
    pub change: u32,
}

impl IfInfo {
    pub const LEN: usize = 16;

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.family;
        b[2..4].copy_from_slice(&self.link_type.to_ne_bytes());
        b[4..8].copy_from_slice(&self.index.to_ne_bytes());
        b[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        b[12..16].copy_from_slice(&self.change.to_ne_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Option<IfInfo> {
        let b = b.get(..Self::LEN)?;
        Some(IfInfo {
            family: b[0],
            link_type: u16::from_ne_bytes([b[2], b[3]]),
            index: i32::from_ne_bytes(b[4..8].try_into().ok()?),
            flags: u32::from_ne_bytes(b[8..12].try_into().ok()?),
            change: u32::from_ne_bytes(b[12..16].try_into().ok()?),
        })
    }
}

/// `struct ifaddrmsg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    pub family: u8,
    pub prefix_len: u8,
    pub flags: u8,
    pub scope: u8,
    pub index: u32,
}

impl IfAddr {
    pub const LEN: usize = 8;

    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.family;
        b[1] = self.prefix_len;
        b[2] = self.flags;
        b[3] = self.scope;
        b[4..8].copy_from_slice(&self.index.to_ne_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Option<IfAddr> {
        let b = b.get(..Self::LEN)?;
        Some(IfAddr {
            family: b[0],
            prefix_len: b[1],
            flags: b[2],
            scope: b[3],
            index: u32::from_ne_bytes(b[4..8].try_into().ok()?),
        })
    }
}

/// `struct rtmsg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RtMsg {
    pub family: u8,
    pub dst_len: u8,
    pub src_len: u8,
    pub tos: u8,
    pub table: u8,
    pub protocol: u8,
    pub scope: u8,
    pub kind: u8,
    pub flags: u32,
}

impl RtMsg {
    pub const LEN: usize = 12;

    pub fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0] = self.family;
        b[1] = self.dst_len;
        b[2] = self.src_len;
        b[3] = self.tos;
        b[4] = self.table;
        b[5] = self.protocol;
        b[6] = self.scope;
        b[7] = self.kind;
        b[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Option<RtMsg> {
        let b = b.get(..Self::LEN)?;
        Some(RtMsg {
            family: b[0],
            dst_len: b[1],
            src_len: b[2],
            tos: b[3],
            table: b[4],
            protocol: b[5],
            scope: b[6],
            kind: b[7],
            flags: u32::from_ne_bytes(b[8..12].try_into().ok()?),
        })
    }
}

/// Walks the attributes of a message body; stops at the first malformed one, since the kernel
/// never sends those and anything after it could not be trusted.
pub struct Attrs<'a> {
    rest: &'a [u8],
}

pub fn attrs(body: &[u8]) -> Attrs<'_> {
    Attrs { rest: body }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let header = self.rest.get(..4)?;
        let len = u16::from_ne_bytes([header[0], header[1]]) as usize;
        // Strip NLA_F_NESTED / NLA_F_NET_BYTEORDER.
        let kind = u16::from_ne_bytes([header[2], header[3]]) & 0x3fff;
        if len < 4 || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let payload = &self.rest[4..len];
        self.rest = self.rest.get(align(len)..).unwrap_or(&[]);
        Some((kind, payload))
    }
}

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// Splits one datagram into messages.
pub fn split_messages(mut buf: &[u8]) -> Result<Vec<Message>> {
    let mut messages = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            bail!(
                "malformed netlink message: length {len} with {} bytes left",
                buf.len()
            );
        }
        messages.push(Message {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            payload: buf[NLMSG_HDRLEN..len].to_vec(),
        });
        buf = buf.get(align(len)..).unwrap_or(&[]);
    }
    Ok(messages)
}

/// The kernel's refusal of a request, with its extended-ack text when it sent one
/// (e.g. "Nexthop has invalid gateway"), which says far more than the errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    pub errno: i32,
    pub message: Option<String>,
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.errno))?;
        if let Some(message) = &self.message {
            write!(f, " (kernel: {message})")?;
        }
        Ok(())
    }
}

impl std::error::Error for KernelError {}

/// Reads an `NLMSG_ERROR` payload: `Ok(())` for an acknowledgement.
pub fn parse_error(message: &Message) -> Result<(), KernelError> {
    let Some(code) = message.payload.get(0..4) else {
        return Err(KernelError {
            errno: libc::EPROTO,
            message: Some("short netlink error message".into()),
        });
    };
    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
    if code == 0 {
        return Ok(());
    }
    let mut text = None;
    if message.flags & NLM_F_ACK_TLVS != 0 {
        // struct nlmsgerr: the error, then the request's header (and body unless capped).
        let echoed = if message.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            message
                .payload
                .get(4..8)
                .map(|l| u32::from_ne_bytes([l[0], l[1], l[2], l[3]]) as usize)
                .unwrap_or(NLMSG_HDRLEN)
        };
        if let Some(tlvs) = message.payload.get(4 + align(echoed)..) {
            text = attrs(tlvs)
                .find(|(kind, _)| *kind == NLMSGERR_ATTR_MSG)
                .map(|(_, v)| str_of(v));
        }
    }
    Err(KernelError {
        errno: code.checked_neg().unwrap_or(libc::EPROTO),
        message: text,
    })
}

pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> Result<Socket> {
        // SAFETY: plain syscall; the result is checked before it is used as a descriptor.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a NETLINK_ROUTE socket");
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // Best effort: kernels before 4.12 have no extended acks, and errors still work.
        // SAFETY: the option value points to a live c_int of the given size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_EXT_ACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl and its size is passed along.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("binding a NETLINK_ROUTE socket");
        }
        Ok(Socket { fd, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all-zero addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: the buffer and address are live for the duration of the call.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    message.as_ptr().cast(),
                    message.len(),
                    0,
                    (&kernel as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// One datagram, however large: its size is peeked first so a big dump part is never cut.
    fn recv(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: the buffer is live and its length is passed along.
            let size = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_TRUNC,
                )
            };
            if size < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let size = size as usize;
            if size > buf.len() {
                buf.resize(size, 0);
            }
            // SAFETY: as above.
            let got = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            buf.truncate(got as usize);
            return Ok(buf);
        }
    }

    /// Sends a dump request and collects every reply message of the given type.
    pub fn dump(&mut self, request: Builder, reply_kind: u16) -> Result<Vec<Message>> {
        let bytes = request.finish(0);
        // A dump interrupted by a concurrent change (NLM_F_DUMP_INTR) may be inconsistent;
        // links appearing while drivers probe make that plausible at boot, so try again.
        for _ in 0..5 {
            let seq = self.next_seq();
            let mut bytes = bytes.clone();
            bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
            self.send(&bytes).context("sending a netlink dump request")?;
            let mut replies = Vec::new();
            let mut interrupted = false;
            'receive: loop {
                let datagram = self.recv().context("reading a netlink dump")?;
                for message in split_messages(&datagram)? {
                    if message.seq != seq {
                        continue;
                    }
                    if message.flags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    match message.kind {
                        NLMSG_DONE => break 'receive,
                        NLMSG_ERROR => {
                            parse_error(&message).context("netlink dump refused")?;
                        }
                        NLMSG_OVERRUN => bail!("netlink dump overran its buffer"),
                        kind if kind == reply_kind => replies.push(message),
                        _ => {}
                    }
                }
            }
            if !interrupted {
                return Ok(replies);
            }
        }
        bail!("netlink dump kept changing under us (NLM_F_DUMP_INTR five times)")
    }

    /// Sends a request that changes something and waits for the kernel's answer.
    pub fn execute(&mut self, request: Builder) -> Result<(), KernelError> {
        let seq = self.next_seq();
        let bytes = request.finish(seq);
        let io_error = |e: io::Error| KernelError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: None,
        };
        self.send(&bytes).map_err(io_error)?;
        loop {
            let datagram = self.recv().map_err(io_error)?;
            let messages = split_messages(&datagram).map_err(|e| KernelError {
                errno: libc::EPROTO,
                message: Some(e.to_string()),
            })?;
            for message in messages {
                if message.seq == seq && message.kind == NLMSG_ERROR {
                    return parse_error(&message);
                }
            }
        }
    }
}

/// Link-level requests shared by `gather` and `apply`.
pub fn getlink_dump() -> Builder {
    Builder::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP)
        .fixed(
            &IfInfo {
                family: 0,
                link_type: 0,
                index: 0,
                flags: 0,
                change: 0,
            }
            .to_bytes(),
        )
        .attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
}

pub fn getaddr_dump() -> Builder {
    Builder::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP).fixed(
        &IfAddr {
            family: 0,
            prefix_len: 0,
            flags: 0,
            scope: 0,
            index: 0,
        }
        .to_bytes(),
    )
}

pub fn getroute_dump(family: u8) -> Builder {
    Builder::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP).fixed(
        &RtMsg {
            family,
            ..RtMsg::default()
        }
        .to_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_libc() {
        assert_eq!(IFLA_ADDRESS, libc::IFLA_ADDRESS);
        assert_eq!(IFLA_IFNAME, libc::IFLA_IFNAME);
        assert_eq!(IFLA_MTU, libc::IFLA_MTU);
        assert_eq!(IFLA_MASTER, libc::IFLA_MASTER);
        assert_eq!(IFLA_LINKINFO, libc::IFLA_LINKINFO);
        assert_eq!(IFLA_INFO_KIND, libc::IFLA_INFO_KIND);
        assert_eq!(IFLA_EXT_MASK, libc::IFLA_EXT_MASK);
        assert_eq!(IFLA_PROP_LIST, libc::IFLA_PROP_LIST);
        assert_eq!(IFLA_ALT_IFNAME, libc::IFLA_ALT_IFNAME);
        assert_eq!(RTEXT_FILTER_SKIP_STATS as i32, libc::RTEXT_FILTER_SKIP_STATS);
        assert_eq!(IFA_ADDRESS, libc::IFA_ADDRESS);
        assert_eq!(IFA_LOCAL, libc::IFA_LOCAL);
        assert_eq!(IFA_CACHEINFO, libc::IFA_CACHEINFO);
        assert_eq!(IFA_F_NODAD, libc::IFA_F_NODAD);
        assert_eq!(IFA_F_TENTATIVE, libc::IFA_F_TENTATIVE);
        assert_eq!(IFA_F_PERMANENT, libc::IFA_F_PERMANENT);
        assert_eq!(RTA_DST, libc::RTA_DST);
        assert_eq!(RTA_OIF, libc::RTA_OIF);
        assert_eq!(RTA_GATEWAY, libc::RTA_GATEWAY);
        assert_eq!(RTA_PRIORITY, libc::RTA_PRIORITY);
        assert_eq!(RTA_MULTIPATH, libc::RTA_MULTIPATH);
        assert_eq!(RTA_TABLE, libc::RTA_TABLE);
        // musl builds of libc lack this one, which is why the constants live here.
        #[cfg(target_env = "gnu")]
        assert_eq!(RTA_VIA, libc::RTA_VIA);
        assert_eq!(RTM_NEWLINK, libc::RTM_NEWLINK);
        assert_eq!(RTM_GETLINK, libc::RTM_GETLINK);
        assert_eq!(RTM_NEWADDR, libc::RTM_NEWADDR);
        assert_eq!(RTM_GETADDR, libc::RTM_GETADDR);
        assert_eq!(RTM_NEWROUTE, libc::RTM_NEWROUTE);
        assert_eq!(RTM_GETROUTE, libc::RTM_GETROUTE);
        assert_eq!(NLM_F_REQUEST as i32, libc::NLM_F_REQUEST);
        assert_eq!(NLM_F_ACK as i32, libc::NLM_F_ACK);
        assert_eq!(NLM_F_DUMP as i32, libc::NLM_F_DUMP);
        assert_eq!(NLM_F_DUMP_INTR as i32, libc::NLM_F_DUMP_INTR);
        assert_eq!(NLM_F_REPLACE as i32, libc::NLM_F_REPLACE);
        assert_eq!(NLM_F_EXCL as i32, libc::NLM_F_EXCL);
        assert_eq!(NLM_F_CREATE as i32, libc::NLM_F_CREATE);
        assert_eq!(NLM_F_CAPPED as i32, libc::NLM_F_CAPPED);
        assert_eq!(NLM_F_ACK_TLVS as i32, libc::NLM_F_ACK_TLVS);
        assert_eq!(NLMSG_ERROR as i32, libc::NLMSG_ERROR);
        assert_eq!(NLMSG_DONE as i32, libc::NLMSG_DONE);
        assert_eq!(NLMSG_OVERRUN as i32, libc::NLMSG_OVERRUN);
        assert_eq!(NETLINK_EXT_ACK, libc::NETLINK_EXT_ACK);
        assert_eq!(SOL_NETLINK, libc::SOL_NETLINK);
        assert_eq!(RTN_UNICAST, libc::RTN_UNICAST);
        assert_eq!(RT_TABLE_MAIN, libc::RT_TABLE_MAIN);
        assert_eq!(RTM_F_CLONED, libc::RTM_F_CLONED);
        assert_eq!(IFF_UP, libc::IFF_UP as u32);
        assert_eq!(IFF_LOOPBACK, libc::IFF_LOOPBACK as u32);
        assert_eq!(ARPHRD_LOOPBACK, libc::ARPHRD_LOOPBACK);
        assert_eq!(AF_INET as i32, libc::AF_INET);
        assert_eq!(AF_INET6 as i32, libc::AF_INET6);
        assert_eq!(IfInfo::LEN, std::mem::size_of::<libc::ifinfomsg>());
        assert_eq!(NLMSG_HDRLEN, std::mem::size_of::<libc::nlmsghdr>());
    }

    #[test]
    fn builder_output_splits_back_into_the_same_message() {
        let info = IfInfo {
            family: 0,
            link_type: 1,
            index: 7,
            flags: IFF_UP,
            change: IFF_UP,
        };
        let bytes = Builder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK)
            .fixed(&info.to_bytes())
            .attr_str(IFLA_IFNAME, "eth0")
            .begin_nested(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "veth")
            .end_nested()
            .attr_u32(IFLA_MTU, 9000)
            .finish(42);
        assert_eq!(bytes.len() % 4, 0);
        let messages = split_messages(&bytes).unwrap();
        assert_eq!(messages.len(), 1);
        let m = &messages[0];
        assert_eq!(
            (m.kind, m.flags, m.seq),
            (RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 42)
        );
        assert_eq!(IfInfo::parse(&m.payload), Some(info));
        let found: Vec<(u16, Vec<u8>)> = attrs(&m.payload[IfInfo::LEN..])
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].0, IFLA_IFNAME);
        assert_eq!(str_of(&found[0].1), "eth0");
        assert_eq!(found[1].0, IFLA_LINKINFO);
        let inner: Vec<_> = attrs(&found[1].1).collect();
        assert_eq!(inner.len(), 1);
        assert_eq!(
            (inner[0].0, str_of(inner[0].1).as_str()),
            (IFLA_INFO_KIND, "veth")
        );
        assert_eq!((found[2].0, u32_of(&found[2].1)), (IFLA_MTU, Some(9000)));
    }

    #[test]
    fn fixed_structs_round_trip() {
        let a = IfAddr {
            family: AF_INET6,
            prefix_len: 64,
            flags: IFA_F_NODAD as u8,
            scope: 0,
            index: 3,
        };
        assert_eq!(IfAddr::parse(&a.to_bytes()), Some(a));
        let r = RtMsg {
            family: AF_INET,
            dst_len: 24,
            table: RT_TABLE_MAIN,
            protocol: 4,
            scope: 253,
            kind: RTN_UNICAST,
            flags: RTNH_F_ONLINK,
            ..RtMsg::default()
        };
        assert_eq!(RtMsg::parse(&r.to_bytes()), Some(r));
        assert_eq!(RtMsg::parse(&[0; 11]), None);
    }

    #[test]
    fn addresses_and_via_round_trip() {
        for ip in ["192.0.2.1", "fe80::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_ip(&ip_bytes(ip)), Some(ip));
            assert_eq!(parse_via(&via_bytes(ip)), Some(ip));
        }
        assert_eq!(parse_ip(&[1, 2, 3]), None);
        // A family that does not match the address length is not trusted.
        let mut bad = via_bytes("fe80::1".parse().unwrap());
        bad[0..2].copy_from_slice(&(AF_INET as u16).to_ne_bytes());
        assert_eq!(parse_via(&bad), None);
    }

    #[test]
    fn malformed_input_is_rejected_not_panicked_on() {
        assert!(split_messages(&[0xff; 20]).is_err());
        let mut short = Builder::new(RTM_NEWLINK, 0).finish(1);
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(split_messages(&short).is_err());
        // An attribute claiming more bytes than there are ends the walk.
        assert_eq!(attrs(&[200, 0, 1, 0, 1, 2]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
    }

    #[test]
    fn errors_carry_errno_and_extended_ack_text() {
        let ack = Message {
            kind: NLMSG_ERROR,
            flags: 0,
            seq: 1,
            payload: [0i32.to_ne_bytes().to_vec(), vec![0; 16]].concat(),
        };
        assert_eq!(parse_error(&ack), Ok(()));

        let request_header = Builder::new(RTM_NEWROUTE, NLM_F_REQUEST).finish(1);
        let tlv = Builder::new(0, 0)
            .attr_str(NLMSGERR_ATTR_MSG, "Nexthop has invalid gateway")
            .finish(0);
        let payload = [
            (-libc::EINVAL).to_ne_bytes().to_vec(),
            request_header,
            tlv[NLMSG_HDRLEN..].to_vec(),
        ]
        .concat();
        let err = parse_error(&Message {
            kind: NLMSG_ERROR,
            flags: NLM_F_CAPPED | NLM_F_ACK_TLVS,
            seq: 1,
            payload,
        })
        .unwrap_err();
        assert_eq!(err.errno, libc::EINVAL);
        assert_eq!(err.message.as_deref(), Some("Nexthop has invalid gateway"));
        assert!(err.to_string().contains("Nexthop has invalid gateway"));
    }
}
