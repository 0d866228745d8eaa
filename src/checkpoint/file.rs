//! Files: atomic, exclusive saves and bounded reads of regular files.
//!
//! A save writes to a fresh temporary file in the target's folder, created
//! exclusively (`O_CREAT | O_EXCL`, mode 0600, a random name: a planted file
//! or symlink at any predictable name is never opened), holds an advisory
//! lock on it while writing, flushes it to disk, renames it over the target
//! and syncs the folder. Each save has its own temporary file, so
//! concurrent saves to one path never write into each other's: the target
//! is always one complete checkpoint, from the save that renamed last, which
//! returned `Ok`. A save that fails removes its temporary file.
//!
//! A process killed mid-save leaves its temporary file behind (nothing can
//! remove it at that moment); the next successful save to the same path
//! removes every such leftover whose lock is free (its writer is gone).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::Error;

pub(crate) fn io(e: std::io::Error) -> Error {
    Error::from(e)
}

/// The temporary-file name pattern of saves to `name`:
/// `.{name}.XXXXXX.adaoptim-tmp`.
fn temp_affixes(name: &std::ffi::OsStr) -> (String, &'static str) {
    (format!(".{}.", name.to_string_lossy()), ".adaoptim-tmp")
}

/// Writes `bytes` to `path` atomically (see the [module docs](crate::checkpoint)).
///
/// # Errors
/// [`Error::Io`] if the temporary file cannot be created, written, synced or
/// renamed; the previous file at `path`, if any, is intact then, and the
/// temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| super::bad("checkpoint path has no file name"))?;
    let (prefix, suffix) = temp_affixes(name);
    let mut tmp = tempfile::Builder::new().prefix(&prefix).suffix(suffix).tempfile_in(&dir).map_err(io)?;
    // Held until this function returns: a concurrent save's cleanup skips
    // files whose lock is taken.
    tmp.as_file().lock().map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    let file = tmp.persist(path).map_err(|e| io(e.error))?;
    // Make the rename itself durable. Opening a folder is not possible on
    // every platform; where it fails the rename still happened.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    remove_stale(&dir, &prefix, suffix);
    drop(file);
    Ok(())
}

/// Removes leftover temporary files of saves to the same name whose writer
/// is gone (their lock is free). Best effort: errors are ignored.
fn remove_stale(dir: &Path, prefix: &str, suffix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(n) = file_name.to_str() else { continue };
        if !(n.starts_with(prefix) && n.ends_with(suffix) && n.len() > prefix.len() + suffix.len()) {
            continue;
        }
        // Only regular files (never follow a link), and only unlocked ones.
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        if let Ok(f) = open_no_follow(&path)
            && f.try_lock().is_ok()
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(unix)]
fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc_flags::NOFOLLOW | libc_flags::NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

/// `open(2)` flags, without a `libc` dependency off Linux.
#[cfg(unix)]
mod libc_flags {
    #[cfg(target_os = "linux")]
    pub const NOFOLLOW: i32 = libc::O_NOFOLLOW;
    #[cfg(target_os = "linux")]
    pub const NONBLOCK: i32 = libc::O_NONBLOCK;
    #[cfg(all(unix, not(target_os = "linux")))]
    pub const NOFOLLOW: i32 = 0x0100;
    #[cfg(all(unix, not(target_os = "linux")))]
    pub const NONBLOCK: i32 = 0x0004;
}

fn not_regular(path: &Path) -> Error {
    Error::from(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{} is not a regular file", path.display()),
    ))
}

/// Reads a whole regular file, never more than the length it has when
/// opened. A FIFO, device or folder is refused before it is read (opened
/// non-blocking, so a FIFO swapped in after the check cannot hang the read
/// either).
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, Error> {
    if !std::fs::metadata(path).map_err(io)?.is_file() {
        return Err(not_regular(path));
    }
    #[cfg(unix)]
    let f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(libc_flags::NONBLOCK).open(path).map_err(io)?
    };
    #[cfg(not(unix))]
    let f = std::fs::File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(path));
    }
    let len =
        usize::try_from(meta.len()).map_err(|_| Error::TooLarge { what: "checkpoint file", elements: usize::MAX })?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len).map_err(|_| Error::TooLarge { what: "checkpoint file", elements: len })?;
    f.take(len as u64).read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}
