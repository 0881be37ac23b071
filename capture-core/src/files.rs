//! Files the core writes and reads back (the stats file, the recorded
//! provider switch, the announced peers).

use std::path::Path;

/// Replaces `path` whole with `bytes`: written beside it first, then
/// renamed over it, so a reader (or a core that crashed halfway) sees the
/// old file or the new one, never a torn one.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_whole_file_and_leaves_no_temporary_behind() {
        let dir = std::env::temp_dir().join(format!("tlshub-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.json");
        super::replace(&path, b"a much longer first version").unwrap();
        super::replace(&path, b"short").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
        assert!(!dir.join("x.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
