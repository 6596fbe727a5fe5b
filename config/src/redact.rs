//! Hides secrets (the JWT secret, a database password) from anything printed or logged.

use crate::Config;

const REDACTED: &str = "<redacted>";

impl Config {
    /// A copy safe to print: the JWT secret and any database password replaced.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if !c.auth.jwt_secret.is_empty() {
            c.auth.jwt_secret = REDACTED.into();
        }
        c.database.url = redact_database_url(&c.database.url);
        c
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:<redacted>@host/db`;
/// `host=h password=secret` → `host=h password=<redacted>`.
pub fn redact_database_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let mut out = format!("{scheme}://");
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                if userinfo.contains(':') {
                    out.push_str(&format!("{user}:{REDACTED}@{host}"));
                } else {
                    out.push_str(&format!("{userinfo}@{host}"));
                }
            }
            None => out.push_str(authority),
        }
        // A password may also ride in the query string.
        out.push_str(&redact_key_values(tail, '&'));
        out
    } else {
        redact_key_values(url, ' ')
    }
}

fn redact_key_values(text: &str, sep: char) -> String {
    text.split(sep)
        .map(|part| {
            let lower = part.to_ascii_lowercase();
            let key = lower.trim_start_matches('?');
            if key.starts_with("password=") {
                let eq = part.find('=').map(|i| i + 1).unwrap_or(part.len());
                format!("{}{REDACTED}", &part[..eq])
            } else {
                part.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(&sep.to_string())
}

#[cfg(test)]
mod tests {
    use super::redact_database_url as r;

    #[test]
    fn hides_passwords_in_every_url_form() {
        assert_eq!(
            r("postgres://app:hunter2@db:5432/fm"),
            "postgres://app:<redacted>@db:5432/fm"
        );
        assert_eq!(r("postgres://app@db/fm"), "postgres://app@db/fm");
        assert_eq!(
            r("postgresql://db/fm?user=a&password=x"),
            "postgresql://db/fm?user=a&password=<redacted>"
        );
        assert_eq!(
            r("host=db user=a password=x dbname=fm"),
            "host=db user=a password=<redacted> dbname=fm"
        );
        assert_eq!(r(""), "");
    }
}
