//! The handshake provider's files on disk: whether they changed since they
//! were loaded, and when the node's certificate expires.

use std::path::{Path, PathBuf};

use x509_cert::Certificate;
use x509_cert::der::DecodePem;

use crate::file_stamp::FileStamp;
use crate::handshake_config::TlsSection;
use crate::types::Credential;

/// The stamps of the CA, certificate, key and node map files (`None`:
/// unreadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesStamp(Vec<Option<FileStamp>>);

impl FilesStamp {
    /// The files of `tls` as they are now.
    pub fn of(tls: &TlsSection) -> Self {
        Self(
            [
                Some(&tls.ca),
                Some(&tls.cert),
                Some(&tls.key),
                tls.node_map.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(|p| FileStamp::of(p))
            .collect(),
        )
    }
}

/// Why the certificate's expiry could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Its first PEM block is not an X.509 certificate.
    #[error("{path} does not start with a PEM certificate: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's words.
        reason: String,
    },
}

/// The node certificate (the first one in the chain file at `path`) as a
/// [`Credential`]: its name and its notAfter.
pub fn certificate_credential(path: &Path) -> Result<Credential, CertificateError> {
    let cert = first_certificate(path)?;
    let not_after = cert.tbs_certificate.validity.not_after.to_unix_duration();
    Ok(Credential {
        name: format!("certificate {}", path.display()),
        not_after_unix_seconds: i64::try_from(not_after.as_secs()).unwrap_or(i64::MAX),
    })
}

/// The first certificate of a PEM file.
fn first_certificate(path: &Path) -> Result<Certificate, CertificateError> {
    let pem = std::fs::read(path).map_err(|source| CertificateError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse = |reason: String| CertificateError::Parse {
        path: path.to_owned(),
        reason,
    };
    let first = first_pem_block(&pem).ok_or_else(|| parse("no PEM block".into()))?;
    Certificate::from_pem(first).map_err(|e| parse(e.to_string()))
}

/// The DNS names (subjectAltName) of the first certificate of a PEM file.
pub fn certificate_dns_names(path: &Path) -> Result<Vec<String>, CertificateError> {
    use x509_cert::der::Encode;
    let parse = |reason: String| CertificateError::Parse {
        path: path.to_owned(),
        reason,
    };
    let der = first_certificate(path)?
        .to_der()
        .map_err(|e| parse(e.to_string()))?;
    dns_names(&der).map_err(parse)
}

/// The DNS names (subjectAltName) of a DER certificate.
pub fn dns_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let cert = Certificate::from_der(der).map_err(|e| e.to_string())?;
    let san = cert
        .tbs_certificate
        .get::<SubjectAltName>()
        .map_err(|e| e.to_string())?;
    Ok(san
        .map(|(_, san)| {
            san.0
                .into_iter()
                .filter_map(|n| match n {
                    GeneralName::DnsName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The first `-----BEGIN ...-----` to `-----END ...-----` block of a chain
/// file (the parser takes exactly one).
fn first_pem_block(pem: &[u8]) -> Option<&[u8]> {
    const END: &[u8] = b"-----END ";
    let start = pem.windows(11).position(|w| w == b"-----BEGIN ")?;
    let rest = &pem[start..];
    let end = rest.windows(END.len()).position(|w| w == END)?;
    let close = rest[end + END.len()..]
        .windows(5)
        .position(|w| w == b"-----")?;
    Some(&rest[..end + END.len() + close + 5])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_block_of_a_chain_is_taken() {
        let chain = b"junk\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            first_pem_block(chain).unwrap(),
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
        );
        assert!(first_pem_block(b"no pem here").is_none());
        assert!(first_pem_block(b"-----BEGIN CERTIFICATE-----\nAAAA\n").is_none());
    }

    #[test]
    fn the_expiry_is_the_certificates_not_after() {
        // `openssl x509 -noout -enddate`: Nov 10 08:54:41 2126 GMT (a
        // GeneralizedTime: after 2049), `date -d ... +%s`: 4949974481.
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/cert-until-2126.pem"
        ));
        let c = certificate_credential(path).unwrap();
        assert_eq!(c.not_after_unix_seconds, 4_949_974_481);
        assert!(c.name.ends_with("cert-until-2126.pem"), "{}", c.name);
    }

    #[test]
    fn a_file_that_is_not_a_certificate_names_the_file() {
        let dir = std::env::temp_dir().join(format!("tlshub-cert-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = certificate_credential(&bad).unwrap_err();
        assert!(matches!(e, CertificateError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("bad.pem"), "{e}");
        let e = certificate_credential(&dir.join("missing.pem")).unwrap_err();
        assert!(matches!(e, CertificateError::Read { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
