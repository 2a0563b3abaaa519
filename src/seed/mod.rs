//! The seed file: Kong declarative YAML, the fallback source of consumers, keys and metadata.
//!
//! Reading happens in two steps so every problem can be reported at once: `yaml` turns text into a
//! tree that knows its lines, `parse` checks the schema over that tree. Keys are hashed in `parse`;
//! the text and the tree are dropped when loading ends, so no plain key outlives it.

pub mod parse;
pub mod record;
pub mod yaml;

use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

pub use parse::SeedData;

use crate::core::capability::CapabilityNames;
use crate::problem::Problem;

/// What reading a seed depends on from the config.
#[derive(Debug, Clone)]
pub struct SeedRules {
    /// `seed.max_bytes`
    pub max_bytes: u64,
    /// `capabilities.names`, which `require_capabilities` may name.
    pub capability_names: CapabilityNames,
}

/// Reads and checks a seed file of at most `rules.max_bytes`; the problems name the file as given.
pub fn load_file(path: &Path, rules: &SeedRules) -> Result<SeedData, Vec<Problem>> {
    let text = read_file(path, rules.max_bytes)?;
    parse_with(&text, &path.display().to_string(), &rules.capability_names)
}

/// The text of a seed file of at most `max_bytes` (a regular file only), unchecked; the problem
/// names the file as given. The text holds plain keys: drop it once it is parsed.
pub fn read_file(path: &Path, max_bytes: u64) -> Result<String, Vec<Problem>> {
    read_seed(path, max_bytes).map_err(|reason| {
        vec![Problem {
            file: path.display().to_string(),
            line: None,
            path: String::new(),
            reason,
        }]
    })
}

/// What a file that is not a regular file is, for messages: `a FIFO`, `a directory`, ...
pub fn file_type_name(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a file"
    }
}

/// The seed text. Only a regular file of at most `max_bytes` is read: a FIFO would block the read
/// (or the open) forever, a device like `/dev/zero` never ends, and a huge file would exhaust memory.
fn read_seed(path: &Path, max_bytes: u64) -> Result<String, String> {
    let before = std::fs::metadata(path).map_err(|e| format!("cannot read the seed file: {e}"))?;
    check_metadata(&before, max_bytes)?;
    read_opened(path, max_bytes)
}

/// Opens, checks what was opened, reads: safe on its own even when `path` is a FIFO or a device.
fn read_opened(path: &Path, max_bytes: u64) -> Result<String, String> {
    // O_NONBLOCK: should the path become a FIFO after the check above, opening it does not wait
    // for a writer (on a regular file the flag changes nothing). O_NOCTTY: nor does a terminal
    // become ours.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot read the seed file: {e}"))?;
    // What was opened is checked again: the path may have been swapped since the first check.
    let opened = file
        .metadata()
        .map_err(|e| format!("cannot read the seed file: {e}"))?;
    check_metadata(&opened, max_bytes)?;
    let bytes = read_at_most(file, opened.len(), max_bytes)?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

fn check_metadata(meta: &Metadata, max_bytes: u64) -> Result<(), String> {
    if !meta.is_file() {
        return Err(format!(
            "not a regular file ({})",
            file_type_name(meta.file_type())
        ));
    }
    if meta.len() > max_bytes {
        return Err(too_large(
            &format!("is {}", size_in_words(meta.len())),
            max_bytes,
        ));
    }
    Ok(())
}

fn too_large(what: &str, max_bytes: u64) -> String {
    format!("{what}, larger than seed.max_bytes ({max_bytes})")
}

/// `629145600 bytes (600 MiB)`.
fn size_in_words(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes >= MIB {
        format!("{bytes} bytes ({} MiB)", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Reads at most `max_bytes + 1` bytes, so a file that grew past the limit after its size was
/// checked is refused instead of read whole.
fn read_at_most(file: File, expected: u64, max_bytes: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    // The expected size is at most max_bytes (checked); an allocation that fails is a message,
    // not an abort.
    let capacity = usize::try_from(expected.saturating_add(1)).unwrap_or(usize::MAX);
    bytes
        .try_reserve_exact(capacity)
        .map_err(|_| format!("not enough memory to read {}", size_in_words(expected)))?;
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the seed file: {e}"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large("grew while it was read", max_bytes));
    }
    Ok(bytes)
}

/// Checks seed text with the default capability names; `label` names the source in problems.
pub fn parse_text(text: &str, label: &str) -> Result<SeedData, Vec<Problem>> {
    parse_with(text, label, &CapabilityNames::default())
}

/// Checks seed text; `label` names the source in problems.
pub fn parse_with(
    text: &str,
    label: &str,
    capability_names: &CapabilityNames,
) -> Result<SeedData, Vec<Problem>> {
    let root = yaml::parse(text).map_err(|e| {
        let reason = match e.column {
            Some(column) => format!("YAML syntax error at column {column}: {}", e.message),
            None => format!("YAML syntax error: {}", e.message),
        };
        vec![Problem {
            file: label.to_owned(),
            line: e.line,
            path: String::new(),
            reason,
        }]
    })?;
    parse::parse_document(&root, label, capability_names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_swapped_for_a_fifo_after_the_check_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("seed.yaml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        // What `read_seed` does after its first check: without O_NONBLOCK this open would wait
        // for a writer forever, so it runs on a thread the test stops waiting for.
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(read_opened(&fifo, 1000)));
        let result = result.recv_timeout(std::time::Duration::from_secs(2));
        assert_eq!(result, Ok(Err("not a regular file (a FIFO)".to_owned())));
    }

    #[test]
    fn a_file_that_grew_past_the_limit_is_not_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.yaml");
        std::fs::write(&path, "0123456789").unwrap();
        // Its size was 5 when checked; it now has 10 bytes.
        let file = File::open(&path).unwrap();
        assert_eq!(
            read_at_most(file, 5, 5),
            Err("grew while it was read, larger than seed.max_bytes (5)".to_owned())
        );
        let file = File::open(&path).unwrap();
        assert_eq!(read_at_most(file, 10, 10).unwrap(), b"0123456789");
    }

    #[test]
    fn sizes_are_given_in_bytes_and_mib() {
        assert_eq!(size_in_words(100), "100 bytes");
        assert_eq!(size_in_words(629_145_600), "629145600 bytes (600 MiB)");
    }

    #[test]
    fn a_seed_that_is_not_utf8_names_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.yaml");
        std::fs::write(&path, b"ab\xffcd").unwrap();
        let rules = SeedRules {
            max_bytes: 100,
            capability_names: CapabilityNames::default(),
        };
        let err = load_file(&path, &rules).unwrap_err();
        assert_eq!(err[0].reason, "not UTF-8 text (invalid byte at offset 2)");
    }
}
