//! Token counting for `/auth-body` (SPEC §8.3): OpenAI's `o200k_base`, from the pure-Rust
//! `tiktoken` crate (vocabulary embedded), built once per process.
//!
//! - **Why this crate.** Measured on this machine (README, "Token limits"): a 100 KB prompt counts
//!   in ~0.5 ms here against ~5.7 ms with `tiktoken-rs`, with identical counts on 20000 random
//!   strings of tricky characters; and `tiktoken-rs` panics (fancy-regex stack overflow, unwrapped
//!   inside the crate) on a megabyte of spaces, which a request must never reach.
//! - **Linear time.** BPE over one huge pre-token (a megabyte of `a`, of spaces, of CJK without
//!   spaces) grows faster than its length. Texts longer than [`CHUNK`] are cut into pieces of at
//!   most that size, preferably just before a space that follows a non-space character: no
//!   o200k pre-token spans such a point (a space only ever starts a pre-token), so that cut changes
//!   nothing. A run with no such point in the second half of a window is cut at a character
//!   boundary instead, which may split a pre-token and change the count by a token or so per cut
//!   (at most one cut per 4 KiB of such a run; README gives the measured error).
//! - **Special tokens** (`<|endoftext|>`) are counted as ordinary text (`CoreBpe::count`), so a
//!   client cannot shrink its count by writing them.
//! - **Repeated texts.** Chat clients resend the whole conversation (system prompt, earlier turns)
//!   on every call, so the count of each text of at least [`CACHED_BYTES`] is remembered in a
//!   fixed table ([`CountCache`]), keyed by the text's length and a SipHash-1-3 digest under a key
//!   drawn at start: a client cannot aim a text at another's slot without knowing the key, and two
//!   texts of one length meet in a slot with a 64-bit digest in common about once in 2^64 lookups.
//!   A hit costs the hash (~1 GB/s) instead of the BPE (~0.2 GB/s); the counts are exact either way.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Mutex, OnceLock, PoisonError};

use tiktoken::CoreBpe;

use crate::core::body::CountTokens;

/// Longest piece handed to the BPE at once.
pub const CHUNK: usize = 4096;

/// Texts from this size on have their counts remembered (shorter ones count in about a µs).
pub const CACHED_BYTES: usize = 256;

/// The o200k_base counter, with the process's count cache.
#[derive(Clone, Copy)]
pub struct O200k {
    bpe: &'static CoreBpe,
    cache: &'static CountCache,
}

static ENCODER: OnceLock<Option<O200k>> = OnceLock::new();

/// The process's encoder, built on first use (the service builds it at start, so no request pays
/// the ~0.2 s). `None` only if the crate lacked its own vocabulary.
pub fn o200k() -> Option<O200k> {
    *ENCODER.get_or_init(|| {
        let bpe = tiktoken::get_encoding("o200k_base")?;
        let cache: &'static CountCache = Box::leak(Box::new(CountCache::new(CACHE_SLOTS)));
        Some(O200k { bpe, cache })
    })
}

/// Slots of the count cache (each 32 bytes: 512 KiB in all).
const CACHE_SLOTS: usize = 16_384;

/// Counts of recent texts, by (length, keyed digest): a fixed table, a new text overwriting its
/// slot, so memory never grows. Each slot has its own lock, held for a compare or a store only.
pub struct CountCache {
    key: std::collections::hash_map::RandomState,
    slots: Box<[Mutex<Slot>]>,
}

#[derive(Default, Clone, Copy)]
struct Slot {
    digest: u64,
    /// 0: empty (texts this short are never cached).
    len: usize,
    count: u64,
}

impl CountCache {
    fn new(slots: usize) -> CountCache {
        CountCache {
            key: std::collections::hash_map::RandomState::new(),
            slots: (0..slots.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    /// The count of `text`, from the table or from `count` (then remembered).
    fn get_or_count(&self, text: &str, count: impl FnOnce() -> u64) -> u64 {
        let mut hasher = self.key.build_hasher();
        hasher.write(text.as_bytes());
        let digest = hasher.finish();
        let slot = &self.slots[(digest % self.slots.len() as u64) as usize];
        let held = *slot.lock().unwrap_or_else(PoisonError::into_inner);
        if held.len == text.len() && held.digest == digest {
            return held.count;
        }
        let counted = count();
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Slot {
            digest,
            len: text.len(),
            count: counted,
        };
        counted
    }
}

/// The encoder if it is built already (never waits for it).
pub fn built() -> Option<O200k> {
    ENCODER.get().copied().flatten()
}

/// Builds the encoder on a thread of its own, so that neither the start nor a request waits.
pub fn warm_up() {
    let _ = std::thread::Builder::new()
        .name("uma-tokenizer".into())
        .spawn(|| {
            if o200k().is_none() {
                tracing::error!("the o200k_base vocabulary is missing: /auth-body answers 503");
            }
        });
}

impl O200k {
    /// The count without the cache.
    pub fn count_uncached(&self, text: &str) -> u64 {
        chunks(text, CHUNK)
            .map(|piece| self.bpe.count(piece) as u64)
            .fold(0, u64::saturating_add)
    }
}

impl CountTokens for O200k {
    fn count(&self, text: &str) -> u64 {
        if text.len() < CACHED_BYTES {
            return self.count_uncached(text);
        }
        self.cache.get_or_count(text, || self.count_uncached(text))
    }
}

/// `text` in pieces of at most `max` bytes (a lone character longer than `max` excepted), cut
/// where no pre-token spans the cut whenever the window allows it (module doc).
pub fn chunks(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = cut_point(rest, max);
        let (piece, after) = rest.split_at(cut);
        rest = after;
        Some(piece)
    })
}

fn cut_point(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    let mut limit = max;
    while !text.is_char_boundary(limit) {
        limit -= 1;
    }
    let window = &text.as_bytes()[..limit];
    // The last space after a non-whitespace character, in the window's second half.
    let clean = (limit / 2..limit).rev().find(|&i| {
        window[i] == b' '
            && text[..i]
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_whitespace())
    });
    match clean {
        Some(cut) => cut,
        // A character longer than the window: take it whole.
        None if limit == 0 => text.chars().next().map_or(text.len(), char::len_utf8),
        None => limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> O200k {
        o200k().expect("o200k_base is bundled")
    }

    #[test]
    fn chunks_cover_the_text_and_stay_bounded() {
        for text in [
            "a".repeat(10_000),
            "가".repeat(5000),
            "word ".repeat(3000),
            " ".repeat(9000),
            "x".to_owned(),
            String::new(),
        ] {
            let pieces: Vec<&str> = chunks(&text, 1000).collect();
            assert_eq!(pieces.concat(), text);
            assert!(pieces.iter().all(|p| p.len() <= 1000 && !p.is_empty()));
        }
        // Cut before a space that follows a word.
        let text = "word ".repeat(300);
        let first = chunks(&text, 1000).next().unwrap();
        assert!(first.ends_with("word") && first.len() > 500, "{first:?}");
        // A window smaller than one character still moves on.
        assert_eq!(chunks("가나", 2).collect::<Vec<_>>(), ["가", "나"]);
    }

    /// Reference counts: from `tiktoken` itself, cross-checked against `tiktoken-rs` (which runs
    /// OpenAI's own regex) on the same machine; "hello world" is 2 tokens and "<|endoftext|>" as
    /// text is 7 in OpenAI's tiktoken too.
    #[test]
    fn known_o200k_counts() {
        let c = counter();
        for (text, tokens) in [
            ("hello world", 2),
            ("hi", 1),
            ("<|endoftext|>", 7),
            (
                "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times; \
                 it was the age of wisdom, it was the age of foolishness. Numbers like 12345 and 3.14159 appear too.\n",
                53,
            ),
            (
                "안녕하세요, 저는 믿음 모델입니다. 오늘 날씨가 좋네요! 한국어 토큰 수를 세어 봅니다.\n",
                27,
            ),
            (
                "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{:?}\", x);\n}\n",
                37,
            ),
            ("🎉🚀 hello 👋🏽 world 🇰🇷 family: 👨‍👩‍👧‍👦\n", 28),
            ("a.\n/b", 3),
        ] {
            assert_eq!(c.count(text), tokens, "{text:?}");
        }
    }

    #[test]
    fn the_cache_returns_the_same_counts() {
        let c = counter();
        let long = "hello world, and again: ".repeat(50);
        let other = "goodbye world, and again ".repeat(50);
        for _ in 0..3 {
            assert_eq!(c.count(&long), c.count_uncached(&long));
            assert_eq!(c.count(&other), c.count_uncached(&other));
        }
        // A table of one slot: texts overwrite each other, and each still gets its own count.
        let tiny = CountCache::new(1);
        assert_eq!(tiny.get_or_count(&long, || 1), 1);
        assert_eq!(tiny.get_or_count(&long, || 99), 1);
        assert_eq!(tiny.get_or_count(&other, || 2), 2);
        assert_eq!(tiny.get_or_count(&long, || 3), 3);
    }

    #[test]
    fn clean_cuts_change_no_count() {
        let c = counter();
        let prose = "The quick brown fox jumps over the lazy dog, again and again. ".repeat(400);
        assert!(prose.len() > 4 * CHUNK);
        assert_eq!(c.count(&prose), c.bpe.count(&prose) as u64);
        let korean = "안녕하세요, 저는 믿음 모델입니다. 오늘 날씨가 좋네요! ".repeat(300);
        assert_eq!(c.count(&korean), c.bpe.count(&korean) as u64);
        // A run of one character cuts into whole tokens of it: the same count.
        let run = "a".repeat(1 << 16);
        assert_eq!(c.count(&run), c.bpe.count(&run) as u64);
    }

    /// Cost on this machine (release build: `cargo test --release --lib tokenizer -- --ignored
    /// --nocapture`). Figures in README.
    #[test]
    #[ignore]
    fn measure() {
        use std::time::Instant;
        let c = counter();
        let mixed = "The quick brown fox jumps over the lazy dog. 안녕하세요, 믿음 모델입니다. \
                     fn main() { println!(\"{:?}\", x); } 🎉🚀 hello 👋🏽\n";
        let time = |label: &str, text: &str| {
            let started = Instant::now();
            let tokens = c.count_uncached(text);
            let first = started.elapsed();
            let started = Instant::now();
            for _ in 0..5 {
                std::hint::black_box(c.count_uncached(text));
            }
            println!(
                "{label:28} {:>8} bytes {tokens:>8} tokens  first {first:>10.2?}  then {:>10.2?}",
                text.len(),
                started.elapsed() / 5
            );
        };
        time("4 KB mixed", &mixed.repeat(4096 / mixed.len()));
        time("100 KB mixed", &mixed.repeat(100_000 / mixed.len()));
        time("1 MiB mixed", &mixed.repeat((1 << 20) / mixed.len()));
        for ch in ["a", " ", "\n", "!", "가", "漢"] {
            let text = ch.repeat((1 << 20) / ch.len());
            time(&format!("1 MiB of {ch:?}"), &text);
        }
        // Where a body's time goes: JSON (a counter that does nothing) against JSON + counting.
        struct Uncached(O200k);
        impl CountTokens for Uncached {
            fn count(&self, text: &str) -> u64 {
                self.0.count_uncached(text)
            }
        }
        struct Nothing;
        impl CountTokens for Nothing {
            fn count(&self, _: &str) -> u64 {
                0
            }
        }
        let entry = crate::core::model::tests::sample_fields("e");
        for size in [4000, 100_000] {
            let text = mixed.repeat(size / mixed.len());
            let body = serde_json::json!({"model": "gpt-4o", "max_tokens": 100,
                "messages": [{"role": "user", "content": text}]})
            .to_string();
            let run = |counter: &dyn CountTokens| {
                let rules = crate::core::body::BodyRules::default();
                let started = Instant::now();
                for _ in 0..20 {
                    let _ = std::hint::black_box(crate::core::body::inspect(
                        body.as_bytes(),
                        true,
                        &entry,
                        rules,
                        counter,
                    ));
                }
                started.elapsed() / 20
            };
            println!(
                "{:>8} byte chat body: JSON alone {:>10.2?}, JSON + o200k {:>10.2?}, JSON + o200k cached {:>10.2?}",
                body.len(),
                run(&Nothing),
                run(&Uncached(c)),
                run(&c)
            );
        }
        let han = "漢字仮名交じり文の日本語と中文句子混合，没有空格。".repeat(30_000);
        let exact = c.bpe.count(&han) as u64;
        let chunked = c.count_uncached(&han);
        println!(
            "CJK without spaces, {} bytes: {exact} tokens whole, {chunked} chunked ({:+.4}%)",
            han.len(),
            (chunked as f64 - exact as f64) * 100.0 / exact as f64
        );
    }
}
