//! `acme:toolkit/text`: word statistics, slugs and word frequencies.
//!
//! A *word* is a whitespace-separated token with its leading and trailing
//! non-alphanumeric characters trimmed off (so `"Hello,"` is `Hello` and
//! `"don't"` stays `don't`); tokens with no alphanumeric content at all
//! (`"--"`, `"!"`) are not words.

use std::collections::{HashMap, HashSet};

use crate::Toolkit;
use crate::bindings::exports::acme::toolkit::text::{Guest, TextStats};

impl Guest for Toolkit {
    fn analyze(input: String) -> TextStats {
        let mut words = 0_usize;
        let mut longest = "";
        let mut longest_len = 0_usize;
        let mut unique = HashSet::new();

        for word in words_of(&input) {
            words += 1;
            let len = word.chars().count();
            // Strictly greater: the *first* of equally long words wins.
            if len > longest_len {
                longest = word;
                longest_len = len;
            }
            unique.insert(word.to_lowercase());
        }

        TextStats {
            words: saturate(words),
            chars: saturate(input.chars().count()),
            longest_word: longest.to_owned(),
            unique_words: saturate(unique.len()),
        }
    }

    fn slugify(input: String) -> String {
        slugify(&input)
    }

    fn word_frequencies(input: String, top: u32) -> Vec<(String, u32)> {
        let mut counts: HashMap<String, u32> = HashMap::new();
        for word in words_of(&input) {
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }

        let mut ranked: Vec<(String, u32)> = counts.into_iter().collect();
        ranked.sort_unstable_by(|(word_a, count_a), (word_b, count_b)| {
            count_b.cmp(count_a).then_with(|| word_a.cmp(word_b))
        });
        ranked.truncate(usize::try_from(top).unwrap_or(usize::MAX));
        ranked
    }

    fn describe() -> String {
        "text: word statistics and slugs".to_owned()
    }
}

/// The words of `input`, in order (see the module docs for the definition).
fn words_of(input: &str) -> impl Iterator<Item = &str> {
    input
        .split_whitespace()
        .map(|token| token.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|word| !word.is_empty())
}

/// Lowercases `input`, folds common accented Latin letters to ASCII and joins
/// the remaining alphanumeric runs with single `-`. Alphanumerics outside the
/// fold table (e.g. Greek or CJK) are kept, lowercased.
fn slugify(input: &str) -> String {
    let mut slug = String::with_capacity(input.len());
    let mut separator_pending = false;

    for c in input.chars().flat_map(char::to_lowercase) {
        if let Some(folded) = fold_latin(c) {
            push_segment(&mut slug, &mut separator_pending, folded);
        } else if c.is_alphanumeric() {
            push_segment(
                &mut slug,
                &mut separator_pending,
                c.encode_utf8(&mut [0; 4]),
            );
        } else {
            separator_pending = true;
        }
    }
    slug
}

/// Appends `segment`, preceded by a `-` if a separator was seen since the
/// last segment (never at the start, so the slug has no leading `-`; a
/// trailing separator is simply never flushed).
fn push_segment(slug: &mut String, separator_pending: &mut bool, segment: &str) {
    if *separator_pending && !slug.is_empty() {
        slug.push('-');
    }
    *separator_pending = false;
    slug.push_str(segment);
}

/// ASCII spelling of a lowercase accented Latin letter, if it has one.
fn fold_latin(c: char) -> Option<&'static str> {
    let folded = match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => "a",
        'æ' => "ae",
        'ç' | 'ć' | 'ĉ' | 'č' => "c",
        'ď' | 'đ' | 'ð' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ė' | 'ę' | 'ě' => "e",
        'ğ' | 'ĝ' => "g",
        'ì' | 'í' | 'î' | 'ï' | 'ī' | 'į' | 'ı' => "i",
        'ł' | 'ľ' | 'ĺ' => "l",
        'ñ' | 'ń' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => "o",
        'œ' => "oe",
        'ŕ' | 'ř' => "r",
        'ś' | 'š' | 'ş' | 'ș' => "s",
        'ß' => "ss",
        'ť' | 'ţ' | 'ț' => "t",
        'þ' => "th",
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' | 'ų' => "u",
        'ý' | 'ÿ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        _ => return None,
    };
    Some(folded)
}

/// A count as a WIT `u32`, saturating (only reachable with >4 GiB inputs).
fn saturate(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert_eq!(slugify("Héllo, World!"), "hello-world");
        assert_eq!(slugify("  Straße -- Ñandú  "), "strasse-nandu");
        assert_eq!(slugify("Über_Größe 2024"), "uber-grosse-2024");
        assert_eq!(slugify("!!!"), "");
    }

    #[test]
    fn stats() {
        let stats = Toolkit::analyze("Hello, hello world! -- Wonderful.".to_owned());
        assert_eq!(stats.words, 4);
        assert_eq!(stats.chars, 33);
        assert_eq!(stats.longest_word, "Wonderful");
        assert_eq!(stats.unique_words, 3);
    }

    #[test]
    fn frequencies() {
        let top = Toolkit::word_frequencies("b a B c a b.".to_owned(), 2);
        assert_eq!(top, vec![("b".to_owned(), 3), ("a".to_owned(), 2)]);
    }
}
