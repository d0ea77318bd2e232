//! Full-text search: which text of an event is indexed, and how a user's search term becomes
//! an FTS5 query.
//!
//! The index (`store::search`) holds the keys the spec lists for `/search`: `content.body` of
//! `m.room.message`, `content.name` of `m.room.name`, `content.topic` of `m.room.topic`. A row
//! is written in the transaction that makes the event part of its room (`build::persist` for
//! local sends and received PDUs, `history` for backfilled ones) and deleted in the one that
//! redacts it (`build::apply_redaction`), so the index never holds text the room no longer
//! shows. Encrypted events (`m.room.encrypted`) carry no readable text: nothing is indexed.

use serde_json::Value;

use crate::{error::Result, store::search as s, store::Connection};

/// The indexed key of each event type that has one.
pub const KEYS: [(&str, &str); 3] = [
    ("m.room.message", "content.body"),
    ("m.room.name", "content.name"),
    ("m.room.topic", "content.topic"),
];

/// The key an event type is indexed under, if any.
pub fn key_of(kind: &str) -> Option<&'static str> {
    KEYS.iter().find(|(t, _)| *t == kind).map(|(_, k)| *k)
}

/// Indexes the searchable text of the event at stream position `pos` (in its own write):
/// nothing for other types, or when the key is not a string.
pub fn index(conn: &Connection, pos: i64, kind: &str, json: &str) -> Result<()> {
    let Some(key) = key_of(kind) else {
        return Ok(());
    };
    let v: Value = serde_json::from_str(json)?;
    let field = key.trim_start_matches("content.");
    if let Some(text) = v["content"][field].as_str() {
        s::insert_search(conn, pos, key, text)?;
    }
    Ok(())
}

/// One element of a parsed search term.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Phrase(Vec<String>),
    Or,
    Not,
}

/// Splits a search term as Synapse does (`_tokenize_query`): `"double quoted"` phrases,
/// case-insensitive `or`, `-word` for NOT; other words are ANDed. Only word characters and
/// `-` make up words; anything else separates them.
fn tokenize(term: &str) -> Vec<Token> {
    let mut out = Vec::new();
    for (i, part) in term.split('"').enumerate() {
        let words = part
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
            .filter(|w| !w.is_empty());
        if i % 2 == 1 {
            let words: Vec<String> = words
                .flat_map(|w| w.split('-'))
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect();
            if !words.is_empty() {
                out.push(Token::Phrase(words));
            }
            continue;
        }
        for w in words {
            let mut w = w;
            while let Some(rest) = w.strip_prefix('-') {
                out.push(Token::Not);
                w = rest;
            }
            if w.is_empty() {
                continue;
            }
            if w.eq_ignore_ascii_case("or") {
                out.push(Token::Or);
            } else {
                out.push(Token::Word(w.to_owned()));
            }
        }
    }
    out
}

/// A quoted FTS5 string: the text is taken literally (the tokenizer splits it), never as
/// query syntax.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The FTS5 query for a user's search term, or `None` when it has nothing to look for.
/// Words match as prefixes (as Synapse's SQLite query does: `word*`), phrases exactly;
/// operators without an operand on each side are dropped (FTS5's NOT and OR are binary),
/// and so is a word negated with nothing before it.
pub fn fts_query(term: &str) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    // The operator waiting for its right operand.
    let mut pending: Option<&str> = None;
    // A NOT with nothing on its left: its operand is left out rather than searched for.
    let mut skip = false;
    for t in tokenize(term) {
        let operand = match t {
            Token::Or => {
                if !parts.is_empty() && pending.is_none() {
                    pending = Some("OR");
                }
                continue;
            }
            Token::Not => {
                if parts.is_empty() {
                    skip = true;
                } else {
                    pending = Some("NOT");
                }
                continue;
            }
            Token::Word(w) => {
                // A hyphenated word is the phrase of its parts (the tokenizer splits it).
                let inner: Vec<&str> = w.split('-').filter(|p| !p.is_empty()).collect();
                if inner.is_empty() {
                    continue;
                }
                format!("{}*", quoted(&inner.join(" ")))
            }
            Token::Phrase(ws) => quoted(&ws.join(" ")),
        };
        if std::mem::take(&mut skip) {
            continue;
        }
        if !parts.is_empty() {
            parts.push(pending.take().unwrap_or("AND").to_owned());
        }
        parts.push(operand);
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// The words FTS5 matched, from text marked by `highlight()` with `\u{1}`…`\u{2}`: what
/// clients highlight (with stemming and prefixes they differ from the words searched for).
pub fn marked_words(marked: &str, into: &mut std::collections::BTreeSet<String>) {
    for piece in marked.split('\u{1}').skip(1) {
        if let Some((word, _)) = piece.split_once('\u{2}') {
            for w in word.split(|c: char| !c.is_alphanumeric()) {
                if !w.is_empty() {
                    into.insert(w.to_owned());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_quoted_and_operators_need_operands() {
        assert_eq!(fts_query("hello").as_deref(), Some("\"hello\"*"));
        assert_eq!(
            fts_query("hello world").as_deref(),
            Some("\"hello\"* AND \"world\"*")
        );
        assert_eq!(
            fts_query("cats or dogs").as_deref(),
            Some("\"cats\"* OR \"dogs\"*")
        );
        assert_eq!(
            fts_query("include -exclude").as_deref(),
            Some("\"include\"* NOT \"exclude\"*")
        );
        assert_eq!(
            fts_query("\"big red\" dog").as_deref(),
            Some("\"big red\" AND \"dog\"*")
        );
        assert_eq!(fts_query("e-mail").as_deref(), Some("\"e mail\"*"));
        // Nothing to look for, or only operators: no query.
        assert_eq!(fts_query(""), None);
        assert_eq!(fts_query("  \" \" or - "), None);
        assert_eq!(fts_query("-alone"), None);
        assert_eq!(fts_query("-not this").as_deref(), Some("\"this\"*"));
        assert_eq!(fts_query("dangling or").as_deref(), Some("\"dangling\"*"));
        // Syntax characters are literal.
        assert_eq!(
            fts_query("a* NEAR(b) c:d").as_deref(),
            Some("\"a\"* AND \"NEAR\"* AND \"b\"* AND \"c\"* AND \"d\"*")
        );
    }

    #[test]
    fn highlighted_words_are_extracted() {
        let mut out = Default::default();
        marked_words("say \u{1}Hello\u{2} to \u{1}helpers\u{2}!", &mut out);
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            vec!["Hello".to_owned(), "helpers".to_owned()]
        );
    }
}
