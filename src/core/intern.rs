//! Header values kept for the life of the process, one copy per distinct value.
//!
//! Every allow answer clones its twelve header values. A value backed by shared heap bytes is
//! reference-counted, and with two worker threads answering for the same consumer that count is one
//! cache line bouncing between cores, twenty-six times an answer. A `'static` value clones without
//! touching memory. Values are interned so a value loaded again (a Redis record re-read every few
//! seconds, a seed reload) reuses its copy: memory grows only with values never seen before.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Bytes of every value interned so far (never freed).
static INTERNED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// How many bytes of values the pool holds: it grows only with values never seen before (a reload
/// of a seed whose values all ran before adds nothing).
pub fn interned_bytes() -> usize {
    INTERNED_BYTES.load(Ordering::Relaxed)
}

/// The `'static` copy of `bytes`, made on first sight.
pub fn intern(bytes: &[u8]) -> &'static [u8] {
    static POOL: OnceLock<Mutex<HashSet<&'static [u8]>>> = OnceLock::new();
    let mut pool = POOL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = pool.get(bytes) {
        return existing;
    }
    let copy: &'static [u8] = Box::leak(bytes.to_vec().into_boxed_slice());
    pool.insert(copy);
    INTERNED_BYTES.fetch_add(copy.len(), Ordering::Relaxed);
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_value() {
        let a = intern(b"kt-midm-base");
        let owned = String::from("kt-midm-base");
        let b = intern(owned.as_bytes());
        assert!(std::ptr::eq(a, b));
        assert_eq!(intern(b"other"), b"other");
    }
}
