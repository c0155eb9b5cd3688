//! Stop strings: finds them in a choice's text as it streams and holds text back only while it
//! could still be the start of one, so a stop string is never emitted, even when it is split
//! across tokens.
//!
//! The matcher sees the detokenizer's UTF-8-safe text pieces. It keeps a pending tail: the
//! longest suffix of the text seen so far that is a proper prefix of some stop string. A new
//! piece is appended to that tail and searched; everything before the earliest match (or before
//! the new tail) is released.

/// What a piece of text released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet: this text is final (possibly empty while a prefix is held back).
    Continue(String),
    /// A stop string matched: `text` is what precedes it and is final; generation ends.
    Stopped {
        /// Text before the stop string.
        text: String,
        /// The stop string that matched.
        stop: String,
    },
}

/// Matches one choice's output against its stop strings.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet released because it may begin a stop string.
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored (they would match everywhere).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Whether there is any stop string to look for.
    pub fn is_active(&self) -> bool {
        !self.stops.is_empty()
    }

    /// Feeds the next piece of text.
    pub fn push(&mut self, piece: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(piece.to_owned());
        }
        self.pending.push_str(piece);
        // The earliest match wins; on equal starts, the first stop string in the list.
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()).map(|at| (at, stop)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = earliest {
            let stop = stop.clone();
            let mut text = std::mem::take(&mut self.pending);
            text.truncate(at);
            return StopOutcome::Stopped { text, stop };
        }
        let hold_from = self.hold_start();
        let tail = self.pending.split_off(hold_from);
        let released = std::mem::replace(&mut self.pending, tail);
        StopOutcome::Continue(released)
    }

    /// Releases the held-back text (the choice ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Start of the longest suffix of `pending` that is a proper prefix of a stop string
    /// (`pending.len()` when there is none). Only char boundaries can start a match, since stop
    /// strings begin with a whole character.
    fn hold_start(&self) -> usize {
        let longest_stop = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = self
            .pending
            .len()
            .saturating_sub(longest_stop.saturating_sub(1));
        (earliest..self.pending.len())
            .filter(|&i| self.pending.is_char_boundary(i))
            .find(|&i| {
                let suffix = &self.pending[i..];
                self.stops.iter().any(|stop| {
                    stop.len() > suffix.len() && stop.as_bytes().starts_with(suffix.as_bytes())
                })
            })
            .unwrap_or(self.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn cont(s: &str) -> StopOutcome {
        StopOutcome::Continue(s.to_owned())
    }

    #[test]
    fn without_stops_everything_passes() {
        let mut m = matcher(&[]);
        assert!(!m.is_active());
        assert_eq!(m.push("hello"), cont("hello"));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn holds_back_only_while_a_match_is_possible() {
        let mut m = matcher(&["END"]);
        assert_eq!(m.push("abc E"), cont("abc "));
        // "EN" may still become "END".
        assert_eq!(m.push("N"), cont(""));
        // "ENx" cannot: all released.
        assert_eq!(m.push("x"), cont("ENx"));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn a_stop_split_across_tokens_is_never_emitted() {
        let mut m = matcher(&["</s>"]);
        let mut emitted = String::new();
        let pieces = ["Hello", " world<", "/", "s", "> and more"];
        let mut stopped = None;
        for piece in pieces {
            match m.push(piece) {
                StopOutcome::Continue(text) => emitted.push_str(&text),
                StopOutcome::Stopped { text, stop } => {
                    emitted.push_str(&text);
                    stopped = Some(stop);
                    break;
                }
            }
        }
        assert_eq!(emitted, "Hello world");
        assert_eq!(stopped.as_deref(), Some("</s>"));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let mut m = matcher(&["world", "lo w"]);
        assert_eq!(
            m.push("hello world"),
            StopOutcome::Stopped {
                text: "hel".into(),
                stop: "lo w".into()
            }
        );
    }

    #[test]
    fn a_stop_inside_one_piece_cuts_the_text() {
        let mut m = matcher(&["\n\n"]);
        assert_eq!(
            m.push("a\n\nb"),
            StopOutcome::Stopped {
                text: "a".into(),
                stop: "\n\n".into()
            }
        );
    }

    #[test]
    fn flush_releases_a_held_prefix() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("go ST"), cont("go "));
        assert_eq!(m.flush(), "ST");
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let mut m = matcher(&["éé!"]);
        assert_eq!(m.push("aé"), cont("a"));
        assert_eq!(m.push("é"), cont(""));
        assert_eq!(m.push("x"), cont("ééx"));
        let mut m = matcher(&["ü"]);
        assert_eq!(m.push("né"), cont("né"));
    }

    #[test]
    fn overlapping_prefixes_keep_the_longest_possible_tail() {
        // "aab" could start at the second 'a' after "aa" turns into "aaa".
        let mut m = matcher(&["aab"]);
        assert_eq!(m.push("aa"), cont(""));
        assert_eq!(m.push("a"), cont("a"));
        assert_eq!(
            m.push("b"),
            StopOutcome::Stopped {
                text: String::new(),
                stop: "aab".into()
            }
        );
    }
}
