//! The kernel's kTLS counters, `/proc/net/tls_stat` (one file per network
//! namespace, `Name value` lines such as `TlsTxSw 12`): the core exports
//! them as metrics, the tests read them to prove sockets got kTLS.

/// The `Tls*` counters in a `tls_stat` file's text; malformed lines are
/// skipped.
pub fn parse(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|l| {
        let mut it = l.split_whitespace();
        let name = it.next()?;
        let v = it.next()?.parse().ok()?;
        name.starts_with("Tls").then_some((name, v))
    })
}

/// The counters of several `tls_stat` files, summed by name.
pub fn sum<'a>(
    files: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeMap<String, u64> {
    let mut sums = std::collections::BTreeMap::new();
    for text in files {
        for (name, v) in parse(text) {
            *sums.entry(name.to_owned()).or_default() += v;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_summed_by_name_and_other_lines_skipped() {
        let a = "TlsCurrTxSw                     \t2\nTlsTxSw 5\nbogus line\nTlsRxSw x\n";
        let b = "TlsTxSw 1\nOther 9\n";
        let s = super::sum([a, b]);
        assert_eq!(s.get("TlsTxSw"), Some(&6));
        assert_eq!(s.get("TlsCurrTxSw"), Some(&2));
        assert_eq!(s.get("TlsRxSw"), None);
        assert_eq!(s.get("Other"), None);
    }
}
