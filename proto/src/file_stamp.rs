//! What identifies one version of a file on disk, so that a provider
//! re-reads a file (certificates, node map, pod map) only when it changed.

use std::path::Path;
use std::time::SystemTime;

/// One version of a file: a file replaced by a rename (or a Kubernetes
/// secret's symlink swap) has another inode, one rewritten in place another
/// modification time or length. The modification time alone misses a
/// replacement within the file system's timestamp granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    /// The stamp of the file at `path` now (following symlinks); `None`
    /// when it cannot be read.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| Self {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_over_the_file_changes_the_stamp_even_with_the_same_time_and_length() {
        let dir = std::env::temp_dir().join(format!("tlshub-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, next) = (dir.join("file"), dir.join("file.new"));
        std::fs::write(&path, "aaaa").unwrap();
        std::fs::write(&next, "bbbb").unwrap();
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        for p in [&path, &next] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let before = FileStamp::of(&path).unwrap();
        assert_eq!(FileStamp::of(&path), Some(before), "stable while unchanged");
        std::fs::rename(&next, &path).unwrap();
        assert_ne!(FileStamp::of(&path), Some(before));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(FileStamp::of(&path), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
