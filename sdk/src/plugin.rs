use serde::de::DeserializeOwned;

use crate::{Context, Export, HandlerError, Migration, Payload, Store};

/// A plugin: its name, its tables, and a handler for each message type.
///
/// A handler is a plain function of the decoded payload, the message's
/// [`Context`] and the [`Store`]; the runtime decodes the payload into the
/// handler's type, checks it with [`Payload::validate`], routes by
/// [`Payload::TYPE`], runs the handler inside the message's transaction, and
/// contains its errors and panics.
///
/// ```
/// use possync_sdk::{Context, HandlerError, Migration, Payload, Plugin, Settings, Store};
///
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct GreetingUpdate { id: String, text: String }
///
/// impl Payload for GreetingUpdate {
///     const TYPE: &'static str = "greeting_update";
/// }
///
/// fn apply(greeting: GreetingUpdate, _: &Context, store: &mut dyn Store) -> Result<(), HandlerError> {
///     store.execute("INSERT OR REPLACE INTO greetings (id, text) VALUES (?1, ?2)",
///                   &[greeting.id.into(), greeting.text.into()])?;
///     Ok(())
/// }
///
/// pub fn plugin(_: &Settings) -> Result<Plugin, String> {
///     Ok(Plugin::new("greetings")
///         .describe("greetings shown on the till")
///         .migrations(&[Migration::new("greetings/1",
///             "CREATE TABLE greetings (id TEXT PRIMARY KEY, text TEXT)")])
///         .on::<GreetingUpdate>(apply))
/// }
/// ```
pub struct Plugin {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) migrations: Vec<Migration>,
    pub(crate) routes: Vec<Route>,
    pub(crate) exports: Vec<Export>,
}

/// One message type of a plugin: how to decode, check and apply it.
pub(crate) struct Route {
    pub(crate) message_type: &'static str,
    pub(crate) schema: fn() -> serde_json::Value,
    pub(crate) check: fn(&str) -> Result<(), HandlerError>,
    pub(crate) apply: Box<Apply>,
}

type Apply = dyn Fn(&str, &Context<'_>, &mut dyn Store) -> Result<(), HandlerError> + Send + Sync;

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field(
                "message_types",
                &self
                    .routes
                    .iter()
                    .map(|r| r.message_type)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// A plugin named `name`: the name config enables it by
    /// (`[plugins] name = false`). Letters, digits and `_`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            migrations: Vec::new(),
            routes: Vec::new(),
            exports: Vec::new(),
        }
    }

    /// A one-line description for `possync plugins list`.
    #[must_use]
    pub fn describe(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Schema changes the plugin needs, run once each, in order, at startup.
    /// Several plugins may list the same migration (same id); it runs once.
    #[must_use]
    pub fn migrations(mut self, migrations: &[Migration]) -> Self {
        self.migrations.extend_from_slice(migrations);
        self
    }

    /// Says how the plugin's tables hold a kind of entity, so that a
    /// terminal can prove it holds what the back office holds: `query`
    /// selects one row per `entity`, its columns the entity `fields` (the
    /// names its payloads give them, after `x-possync-entity`'s renames)
    /// in that order, the id first. The back office sums a digest of those
    /// fields of each entity as changes are made, the terminal sums the
    /// rows, and a difference has the terminal converge from a snapshot.
    ///
    /// List only fields the tables hold as the payload gave them; a value
    /// the table cannot tell from nothing (`NULL`, `''`, an empty JSON
    /// array) counts as absent, numbers and text compare by value, and a
    /// column may hold a JSON array or object (`json_group_array(...)`),
    /// compared as a set (order and repeats do not count). A field named
    /// `name{a,b}` compares only the members `a` and `b` of its objects.
    ///
    /// ```
    /// # use possync_sdk::Plugin;
    /// let plugin = Plugin::new("greetings").export(
    ///     "greeting",
    ///     &["greeting_id", "text"],
    ///     "SELECT id, text FROM greetings",
    /// );
    /// ```
    #[must_use]
    pub fn export(mut self, entity: &str, fields: &[&str], query: &str) -> Self {
        self.exports.retain(|export| export.entity != entity);
        self.exports.push(Export {
            entity: entity.to_owned(),
            fields: fields.iter().map(|field| (*field).to_owned()).collect(),
            query: query.to_owned(),
        });
        self
    }

    /// Applies messages of type `T::TYPE` with `handler`.
    ///
    /// A payload that does not decode into `T`, or that `T::validate`
    /// refuses, never reaches the handler: it is dead-lettered with the
    /// reason. What the handler writes through the store is committed with
    /// the message, or rolled back if it returns an error or panics.
    #[must_use]
    pub fn on<T: Payload>(
        mut self,
        handler: impl Fn(T, &Context<'_>, &mut dyn Store) -> Result<(), HandlerError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.routes.retain(|route| route.message_type != T::TYPE);
        self.routes.push(Route {
            message_type: T::TYPE,
            schema: schema_of::<T>,
            check: |payload| decode::<T>(payload).map(drop),
            apply: Box::new(move |payload, message, store| {
                handler(decode::<T>(payload)?, message, store)
            }),
        });
        self
    }
}

fn schema_of<T: Payload>() -> serde_json::Value {
    serde_json::Value::from(schemars::schema_for!(T))
}

/// The payload as `T`, checked; the error says what is wrong with it.
fn decode<T: Payload>(payload: &str) -> Result<T, HandlerError> {
    let value: T = serde_json::from_str(payload)
        .map_err(|err| HandlerError::permanent(format!("invalid {} payload: {err}", T::TYPE)))?;
    value.validate().map_err(|reason| {
        HandlerError::permanent(format!("invalid {} payload: {reason}", T::TYPE))
    })?;
    Ok(value)
}

/// A plugin's `settings` table from config, as its plugin function gets it.
///
/// ```
/// use possync_sdk::Settings;
///
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct TableSettings { max_seats: u32 }
///
/// // [plugins.tables.settings] max_seats = 12
/// let settings = Settings::new("tables", serde_json::json!({ "max_seats": 12 }));
/// assert_eq!(settings.get::<TableSettings>().unwrap().max_seats, 12);
///
/// let typo = Settings::new("tables", serde_json::json!({ "max_seat": 12 }));
/// let err = typo.get::<TableSettings>().err().unwrap();
/// assert!(err.starts_with("[plugins.tables.settings] is not valid"));
/// ```
#[derive(Debug, Clone)]
pub struct Settings {
    plugin: String,
    values: serde_json::Value,
    applies: bool,
}

impl Settings {
    /// The settings `values` of the plugin config knows as `plugin`, for a
    /// plugin that applies messages.
    pub fn new(plugin: impl Into<String>, values: serde_json::Value) -> Self {
        Self {
            plugin: plugin.into(),
            values,
            applies: true,
        }
    }

    /// The same settings for a plugin loaded only to describe and check
    /// payloads (see [`applies`](Self::applies)).
    #[must_use]
    pub fn checking_only(mut self) -> Self {
        self.applies = false;
        self
    }

    /// Whether the plugin will apply messages (on a terminal), or is only
    /// asked to describe and check payloads (by `possync publish` in a back
    /// office). A plugin that needs a folder, a device or a service to apply
    /// its messages should require and prepare them only when this is true,
    /// so that a publisher can check its payloads without them.
    pub fn applies(&self) -> bool {
        self.applies
    }

    /// The name config knows the plugin by.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The settings, decoded; the error names the table, the key and the
    /// problem, never the value (a setting may be a password). Use
    /// `#[serde(deny_unknown_fields)]` so that a typo is an error, and
    /// `#[serde(default)]` so that a plugin without settings starts.
    pub fn get<T: DeserializeOwned>(&self) -> Result<T, String> {
        let values = match &self.values {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            other => other.clone(),
        };
        serde_path_to_error::deserialize(values).map_err(|err| {
            let path = err.path().to_string();
            let problem = without_values(&err.into_inner().to_string());
            // "unknown field `x`" and "missing field `x`" name their key.
            let key = if path == "." || problem.contains(" field `") {
                String::new()
            } else {
                format!(" {path}")
            };
            format!(
                "[plugins.{}.settings]{key} is not valid: {problem}",
                self.plugin
            )
        })
    }
}

/// A serde error's message with the value it quotes left out: `invalid
/// type: string "hunter2", expected usize` becomes `invalid type: string,
/// expected usize`. Keys (`unknown field `x``) stay: they are the config's
/// own words.
fn without_values(message: &str) -> String {
    for lead in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(lead)
            && let Some((unexpected, expected)) = rest.split_once(", expected ")
        {
            let kind = unexpected
                .split(['"', '`'])
                .next()
                .unwrap_or_default()
                .trim();
            return format!("{lead}{kind}, expected {expected}");
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ")
        && let Some((_, expected)) = rest.split_once(", expected ")
    {
        return format!("unknown variant, expected {expected}");
    }
    message.to_owned()
}

/// A plugin's function: builds the plugin from its settings, or says why
/// it cannot. The error stops the terminal at startup with the reason.
///
/// ```
/// use possync_sdk::{Plugin, PluginFn, Settings};
///
/// fn tables(settings: &Settings) -> Result<Plugin, String> {
///     let max_seats: u32 = settings.get::<Option<u32>>()?.unwrap_or(20);
///     if max_seats == 0 {
///         return Err("max_seats must be 1 or more".into());
///     }
///     Ok(Plugin::new("tables"))
/// }
/// let plugin: PluginFn = tables;
/// assert!(plugin(&Settings::new("tables", serde_json::json!(0))).is_err());
/// ```
pub type PluginFn = fn(&Settings) -> Result<Plugin, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Upload {
        max_bytes: usize,
        mode: Mode,
        #[serde(default)]
        token: Option<u32>,
    }

    #[derive(Debug, serde::Deserialize)]
    enum Mode {
        Fast,
    }

    fn refused(values: serde_json::Value) -> String {
        Settings::new("upload", values)
            .get::<Upload>()
            .expect_err("refused")
    }

    #[test]
    fn a_setting_of_the_wrong_kind_is_named_by_its_key_never_shown() {
        let err = refused(serde_json::json!({"max_bytes": "TopSecret123", "mode": "Fast"}));
        assert_eq!(
            err,
            "[plugins.upload.settings] max_bytes is not valid: invalid type: string, expected usize"
        );
        let err = refused(serde_json::json!({"max_bytes": 1, "mode": "Fast", "token": -77123}));
        assert!(!err.contains("77123") && err.contains("token"), "{err}");
        let err = refused(serde_json::json!({"max_bytes": 1, "mode": "Secret-Mode"}));
        assert!(
            !err.contains("Secret-Mode") && err.contains("mode"),
            "{err}"
        );
    }

    #[test]
    fn a_misspelt_or_missing_key_is_named() {
        let err = refused(serde_json::json!({"max_byte": 1, "mode": "Fast"}));
        assert!(err.contains("unknown field `max_byte`"), "{err}");
        let err = refused(serde_json::json!({"mode": "Fast"}));
        assert!(err.contains("missing field `max_bytes`"), "{err}");
    }
}
