//! Merging Prometheus text-format scrapes: the supervisor's own and each worker's, the
//! worker samples labelled with `kind` and `instance`. Families keep one `# HELP`/`# TYPE`
//! and all their samples together, as the format requires. Pure text processing.

use std::collections::BTreeMap;

#[derive(Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Collects families from several scrapes.
#[derive(Default)]
pub struct Merged {
    families: BTreeMap<String, Family>,
    order: Vec<String>,
}

fn family_of(sample_name: &str, known: &BTreeMap<String, Family>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample_name.strip_suffix(suffix) {
            if known.contains_key(base) {
                return base.to_string();
            }
        }
    }
    sample_name.to_string()
}

/// Adds `extra` labels (already formatted as `k="v"`) to one sample line.
fn relabel(line: &str, extra: &str) -> String {
    if extra.is_empty() {
        return line.to_string();
    }
    match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let (name, rest) = line.split_at(i);
            let rest = &rest[1..];
            if rest.starts_with('}') {
                format!("{name}{{{extra}{rest}")
            } else {
                format!("{name}{{{extra},{rest}")
            }
        }
        Some(i) => {
            let (name, rest) = line.split_at(i);
            format!("{name}{{{extra}}}{rest}")
        }
        None => line.to_string(),
    }
}

/// `labels` as the text inside a sample's braces: `k="v",k2="v2"`, values escaped.
fn label_text(labels: &[(&str, &str)]) -> String {
    let extra: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    extra.join(",")
}

/// One line of a scrape, by what it does to the merge.
enum Line<'a> {
    /// `# HELP <family> ...`
    Help(&'a str),
    /// `# TYPE <family> ...`
    Type(&'a str),
    /// A sample of the series named here.
    Sample(&'a str),
    /// Blank, another comment, or a HELP/TYPE line without its text.
    Skip,
}

impl<'a> Line<'a> {
    fn of(line: &'a str) -> Self {
        let family = |rest: &'a str| rest.split_once(' ').map(|(name, _)| name);
        if line.is_empty() {
            Line::Skip
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            family(rest).map_or(Line::Skip, Line::Help)
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            family(rest).map_or(Line::Skip, Line::Type)
        } else if line.starts_with('#') {
            Line::Skip
        } else {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            Line::Sample(&line[..name_end])
        }
    }
}

impl Merged {
    fn family(&mut self, name: &str) -> &mut Family {
        if !self.families.contains_key(name) {
            self.order.push(name.to_string());
        }
        self.families.entry(name.to_string()).or_default()
    }

    /// Adds one scrape; `labels` are `(name, value)` pairs added to every sample.
    pub fn add(&mut self, text: &str, labels: &[(&str, &str)]) {
        let extra = label_text(labels);
        for line in text.lines().map(str::trim_end) {
            match Line::of(line) {
                Line::Help(name) => {
                    let f = self.family(name);
                    f.help.get_or_insert_with(|| line.to_string());
                }
                Line::Type(name) => {
                    let f = self.family(name);
                    f.kind.get_or_insert_with(|| line.to_string());
                }
                Line::Sample(name) => {
                    let family = family_of(name, &self.families);
                    let sample = relabel(line, &extra);
                    self.family(&family).samples.push(sample);
                }
                Line::Skip => {}
            }
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for name in &self.order {
            let Some(f) = self.families.get(name) else {
                continue;
            };
            for header in [&f.help, &f.kind].into_iter().flatten() {
                out.push_str(header);
                out.push('\n');
            }
            for s in &f.samples {
                out.push_str(s);
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKER: &str = "# TYPE crdt_conflicts_total counter\ncrdt_conflicts_total 3\n\n# TYPE sync_latency_seconds histogram\nsync_latency_seconds_bucket{client_type=\"tablet\",le=\"0.001\"} 1\nsync_latency_seconds_sum{client_type=\"tablet\"} 0.0004\nsync_latency_seconds_count{client_type=\"tablet\"} 1\n";

    #[test]
    fn merges_families_and_labels_worker_samples() {
        let mut m = Merged::default();
        m.add(
            "# TYPE active_connections gauge\nactive_connections 2\n",
            &[],
        );
        m.add(WORKER, &[("kind", "sync"), ("instance", "0")]);
        m.add(WORKER, &[("kind", "sync"), ("instance", "1")]);
        let text = m.render();
        assert_eq!(
            text.matches("# TYPE crdt_conflicts_total counter").count(),
            1
        );
        assert!(
            text.contains("crdt_conflicts_total{kind=\"sync\",instance=\"0\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("crdt_conflicts_total{kind=\"sync\",instance=\"1\"} 3"),
            "{text}"
        );
        assert!(text.contains(
            "sync_latency_seconds_bucket{kind=\"sync\",instance=\"1\",client_type=\"tablet\",le=\"0.001\"} 1"
        ), "{text}");
        assert!(text.contains("active_connections 2"));
        // Both instances' histogram samples sit under the one TYPE line.
        let ty = text.find("# TYPE sync_latency_seconds").unwrap();
        let last = text.rfind("sync_latency_seconds_count").unwrap();
        assert!(!text[ty..last].contains("# TYPE crdt"));
    }

    #[test]
    fn relabels_every_sample_shape() {
        assert_eq!(relabel("a 1", "k=\"v\""), "a{k=\"v\"} 1");
        assert_eq!(relabel("a{} 1", "k=\"v\""), "a{k=\"v\"} 1");
        assert_eq!(relabel("a{x=\"y\"} 1", "k=\"v\""), "a{k=\"v\",x=\"y\"} 1");
        assert_eq!(relabel("a{x=\"y\"} 1", ""), "a{x=\"y\"} 1");
    }

    #[test]
    fn help_and_type_stay_once_and_other_comments_go() {
        let mut m = Merged::default();
        let scrape = "# HELP a_total Things.\n# TYPE a_total counter\n# a comment\n# HELP\n# TYPE b\n\na_total 1\n";
        m.add(scrape, &[("instance", "0")]);
        m.add(scrape, &[("instance", "a\"b\\c")]);
        assert_eq!(
            m.render(),
            "# HELP a_total Things.\n# TYPE a_total counter\na_total{instance=\"0\"} 1\na_total{instance=\"a\\\"b\\\\c\"} 1\n"
        );
    }
}
