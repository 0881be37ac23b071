//! An address prefix (`10.0.1.0/24`, `fd00::/64`), as the core's policy
//! and the providers' node map write it.

use std::net::IpAddr;
use std::str::FromStr;

use serde::Deserialize;

/// An address prefix, `10.0.1.0/24` or `fd00::/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length in the address's own family.
    pub prefix: u8,
}

impl Cidr {
    /// The prefix of `addr` alone (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }

    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as its
    /// IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// Prefix length over the 16-byte mapped form the BPF maps use.
    pub fn mapped_prefix(&self) -> u32 {
        match self.addr {
            IpAddr::V4(_) => 96 + u32::from(self.prefix),
            IpAddr::V6(_) => u32::from(self.prefix),
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a CIDR (want ADDR/LEN)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{p}` is not a prefix length (0..={max})"))?;
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_by_family_and_prefix() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("10.0.1.0/24").contains(ip("10.0.1.200")));
        assert!(c("10.0.1.0/24").contains(ip("::ffff:10.0.1.2")));
        assert!(!c("10.0.1.0/24").contains(ip("10.0.2.1")));
        assert!(c("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(c("fd00:1::/64").contains(ip("fd00:1::5")));
        assert!(!c("fd00:1::/64").contains(ip("fd00:2::5")));
        assert!(!c("fd00:1::/64").contains(ip("10.0.1.2")));
        assert!(c("10.0.1.2/32").contains(ip("10.0.1.2")));
        assert!("10.0.1.0/33".parse::<Cidr>().is_err());
    }
}
