//! Process plumbing every tlshub binary shares: logging setup and TOML
//! configuration files whose errors name the file, line and key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The read's error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse or holds a bad value; the TOML error carries
    /// line, column and key.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, with its location.
        #[source]
        source: toml::de::Error,
    },
}

/// Parses `text` (read from `path`, for messages) as `T`.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Reads and parses the TOML file at `path` as `T`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(path, &text)
}

/// Raises this process's soft limit on open files to its hard limit, and
/// logs the change. Why: the core holds a duplicate of every socket it is
/// keying, and a handshake provider another, so a burst of new
/// connections needs as many files at once; systemd starts services with
/// a soft limit of 1,024 (hard 524,288), and a burst past the soft limit
/// failed its connections with `EMFILE` (`gate_burst_beyond_the_open_files_soft_limit`).
/// Nothing here calls `select()`, the one reason to keep the soft limit low.
/// The soft limit in effect afterwards (`None`: unlimited).
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return limit.current;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(
                from = limit.current,
                to = limit.maximum,
                "raised the soft limit on open files to the hard limit"
            );
            limit.maximum
        }
        Err(e) => {
            tracing::warn!(
                soft = limit.current,
                hard = limit.maximum,
                error = %e,
                "cannot raise the soft limit on open files; a burst of new connections past it fails with EMFILE"
            );
            limit.current
        }
    }
}

/// Logs to stderr at `info` unless `RUST_LOG` says otherwise. Under
/// systemd (stderr connected to the journal, `JOURNAL_STREAM` set) lines
/// carry no timestamp and no colours: journald stamps each line itself.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

    #[test]
    fn the_soft_limit_on_open_files_is_raised_to_the_hard_one() {
        let before = getrlimit(Resource::Nofile);
        // Start below the hard limit, as systemd starts a service (1,024:
        // other tests of this process may be holding files meanwhile).
        let low = Rlimit {
            current: Some(
                before
                    .maximum
                    .map_or(1024, |hard| hard.saturating_sub(1).min(1024)),
            ),
            maximum: before.maximum,
        };
        setrlimit(Resource::Nofile, low).unwrap();
        assert_eq!(super::raise_open_files_limit(), before.maximum);
        assert_eq!(getrlimit(Resource::Nofile).current, before.maximum);
    }
}
