//! A small CloudFormation evaluator: enough of the intrinsic functions to read
//! the templates in `infra/` as a deployed stack would see them.
//!
//! The cross-check tests compare what the templates *resolve to* (the table
//! name in a policy ARN, the queue URL in user-data, the cluster name in an
//! alarm's dimensions) with what the agent expects. Resource attributes that
//! only exist after deployment are synthesized in the shape AWS returns
//! (`Ref` of a queue is its URL, `GetAtt Table.Arn` a table ARN), from the
//! resource's own name property, so a name that disagrees still shows.

use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Account and region the synthesized ARNs use (documentation values).
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "eu-west-1";

/// A template with parameter values, ready to evaluate.
#[derive(Debug, Clone)]
pub struct Stack {
    pub template: Value,
    pub params: BTreeMap<String, String>,
}

impl Stack {
    /// `template` with `params`; parameters not given take their Default.
    pub fn new(template: Value, params: &[(&str, &str)]) -> Stack {
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        if let Some(declared) = template["Parameters"].as_object() {
            for (name, decl) in declared {
                if let Some(default) = decl.get("Default") {
                    all.insert(name.clone(), scalar(default));
                }
            }
        }
        for (k, v) in params {
            all.insert(k.to_string(), v.to_string());
        }
        Stack {
            template,
            params: all,
        }
    }

    /// The resources, by logical id.
    pub fn resources(&self) -> &Map<String, Value> {
        self.template["Resources"]
            .as_object()
            .expect("template has Resources")
    }

    /// One resource's definition.
    pub fn resource(&self, id: &str) -> &Value {
        self.resources()
            .get(id)
            .unwrap_or_else(|| panic!("template has no resource {id}"))
    }

    /// The logical ids of resources of `kind` (e.g. `AWS::IAM::Role`), sorted.
    pub fn of_type(&self, kind: &str) -> Vec<String> {
        self.resources()
            .iter()
            .filter(|(_, r)| r["Type"] == kind)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A resource's property, evaluated.
    pub fn prop(&self, id: &str, name: &str) -> Value {
        self.eval(&self.resource(id)["Properties"][name])
    }

    /// `value` with every intrinsic function resolved.
    pub fn eval(&self, value: &Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.iter().map(|v| self.eval(v)).collect()),
            Value::Object(map) if map.len() == 1 => {
                let (key, arg) = map.iter().next().expect("one entry");
                match key.as_str() {
                    "Ref" => Value::String(self.reference(str_of(arg))),
                    "Fn::GetAtt" => {
                        let parts: Vec<&str> = match arg {
                            Value::Array(a) => a.iter().map(str_of).collect(),
                            Value::String(s) => s.splitn(2, '.').collect(),
                            other => panic!("Fn::GetAtt {other}"),
                        };
                        Value::String(self.attribute(parts[0], parts[1]))
                    }
                    "Fn::Sub" => Value::String(self.substitute(arg)),
                    "Fn::FindInMap" => {
                        let a: Vec<String> = arg
                            .as_array()
                            .expect("FindInMap list")
                            .iter()
                            .map(|v| scalar(&self.eval(v)))
                            .collect();
                        self.template["Mappings"][&a[0]][&a[1]][&a[2]].clone()
                    }
                    "Fn::Base64" => self.eval(arg),
                    "Fn::Join" => {
                        let a = arg.as_array().expect("Join list");
                        let parts: Vec<String> = self
                            .eval(&a[1])
                            .as_array()
                            .expect("Join items")
                            .iter()
                            .map(scalar)
                            .collect();
                        Value::String(parts.join(str_of(&a[0])))
                    }
                    "Fn::Select" => {
                        let a = arg.as_array().expect("Select list");
                        let index: usize = scalar(&self.eval(&a[0])).parse().expect("index");
                        self.eval(&a[1])[index].clone()
                    }
                    "Fn::If" => {
                        let a = arg.as_array().expect("If list");
                        if self.condition(str_of(&a[0])) {
                            self.eval(&a[1])
                        } else {
                            self.eval(&a[2])
                        }
                    }
                    _ => {
                        Value::Object(map.iter().map(|(k, v)| (k.clone(), self.eval(v))).collect())
                    }
                }
            }
            Value::Object(map) => {
                Value::Object(map.iter().map(|(k, v)| (k.clone(), self.eval(v))).collect())
            }
            other => other.clone(),
        }
    }

    fn condition(&self, name: &str) -> bool {
        let def = &self.template["Conditions"][name];
        self.truth(def)
    }

    fn truth(&self, def: &Value) -> bool {
        let map = def.as_object().expect("condition is an object");
        let (key, arg) = map.iter().next().expect("one entry");
        let a = arg.as_array();
        match key.as_str() {
            "Fn::Equals" => {
                let a = a.expect("Equals list");
                scalar(&self.eval(&a[0])) == scalar(&self.eval(&a[1]))
            }
            "Fn::Not" => !self.truth(&a.expect("Not list")[0]),
            "Fn::And" => a.expect("And list").iter().all(|c| self.truth(c)),
            "Fn::Or" => a.expect("Or list").iter().any(|c| self.truth(c)),
            "Condition" => self.condition(str_of(arg)),
            other => panic!("unsupported condition {other}"),
        }
    }

    fn reference(&self, name: &str) -> String {
        match name {
            "AWS::Region" => return REGION.into(),
            "AWS::AccountId" => return ACCOUNT.into(),
            "AWS::Partition" => return "aws".into(),
            "AWS::StackName" => return "kubeboot-stack".into(),
            "AWS::URLSuffix" => return "amazonaws.com".into(),
            _ => {}
        }
        if let Some(v) = self.params.get(name) {
            return v.clone();
        }
        let r = self.resource(name);
        let named = |prop: &str| {
            scalar(&self.eval(&r["Properties"][prop]))
                .trim_matches('"')
                .to_string()
        };
        match r["Type"].as_str().unwrap_or_default() {
            "AWS::SQS::Queue" => format!(
                "https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{}",
                named("QueueName")
            ),
            "AWS::DynamoDB::Table" => named("TableName"),
            "AWS::S3::Bucket" => named("BucketName"),
            "AWS::Logs::LogGroup" => named("LogGroupName"),
            "AWS::AutoScaling::AutoScalingGroup" => named("AutoScalingGroupName"),
            "AWS::SecretsManager::Secret" => format!(
                "arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{}-AbCdEf",
                named("Name")
            ),
            "AWS::SNS::Topic" => format!("arn:aws:sns:{REGION}:{ACCOUNT}:{}", named("TopicName")),
            "AWS::KMS::Key" => format!("key-{name}"),
            _ => format!("{name}-id"),
        }
    }

    fn attribute(&self, id: &str, attr: &str) -> String {
        let r = self.resource(id);
        let kind = r["Type"].as_str().unwrap_or_default();
        let named = |prop: &str| scalar(&self.eval(&r["Properties"][prop]));
        match (kind, attr) {
            ("AWS::DynamoDB::Table", "Arn") => format!(
                "arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{}",
                named("TableName")
            ),
            ("AWS::SQS::Queue", "Arn") => {
                format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{}", named("QueueName"))
            }
            ("AWS::SQS::Queue", "QueueName") => named("QueueName"),
            ("AWS::S3::Bucket", "Arn") => format!("arn:aws:s3:::{}", named("BucketName")),
            ("AWS::KMS::Key", "Arn") => format!("arn:aws:kms:{REGION}:{ACCOUNT}:key/key-{id}"),
            ("AWS::Logs::LogGroup", "Arn") => format!(
                "arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{}:*",
                named("LogGroupName")
            ),
            ("AWS::ElasticLoadBalancingV2::LoadBalancer", "DNSName") => format!(
                // AWS keeps the case of the generated load balancer name.
                "internal-{}-0123456789abcdef.elb.{REGION}.amazonaws.com",
                id
            ),
            ("AWS::EC2::LaunchTemplate", "LatestVersionNumber") => "1".into(),
            (_, "Arn") => format!("arn:aws:synthesized:{REGION}:{ACCOUNT}:{id}"),
            _ => format!("{id}.{attr}"),
        }
    }

    fn substitute(&self, arg: &Value) -> String {
        let (text, vars) = match arg {
            Value::String(s) => (s.as_str(), Map::new()),
            Value::Array(a) => (str_of(&a[0]), a[1].as_object().cloned().unwrap_or_default()),
            other => panic!("Fn::Sub {other}"),
        };
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            if let Some(literal) = after.strip_prefix('!') {
                // `${!Literal}` is written as `${Literal}`.
                out.push_str("${");
                rest = literal;
                continue;
            }
            let end = after.find('}').expect("unterminated ${ in Fn::Sub");
            let name = &after[..end];
            let value = match vars.get(name) {
                Some(v) => scalar(&self.eval(v)),
                None => match name.split_once('.') {
                    Some((id, attr)) if !name.starts_with("AWS::") => self.attribute(id, attr),
                    _ => self.reference(name),
                },
            };
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// A scalar's text (strings unquoted, numbers and booleans as written).
pub fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn str_of(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

/// Every value of `key` anywhere under `value` (e.g. every `Fn::FindInMap`).
pub fn find_all<'a>(value: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == key {
                    out.push(v);
                }
                find_all(v, key, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| find_all(v, key, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stack() -> Stack {
        Stack::new(
            json!({
                "Parameters": {"Stage": {"Type": "String"}, "Size": {"Type": "String", "Default": "3"}},
                "Mappings": {"S": {"dev": {"N": "1"}, "production": {"N": "5"}}},
                "Conditions": {"Prod": {"Fn::Equals": [{"Ref": "Stage"}, "production"]}},
                "Resources": {
                    "Q": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": {"Fn::Sub": "q-${Stage}"}}},
                    "T": {"Type": "AWS::DynamoDB::Table", "Properties": {"TableName": "t"}}
                }
            }),
            &[("Stage", "dev")],
        )
    }

    #[test]
    fn refs_subs_and_attributes_resolve_as_a_deployed_stack_sees_them() {
        let s = stack();
        assert_eq!(
            s.eval(&json!({"Ref": "Q"})),
            json!(format!(
                "https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/q-dev"
            ))
        );
        assert_eq!(
            s.eval(&json!({"Fn::Sub": "${T.Arn}|${Size}|${!Literal}|${AWS::Region}"})),
            json!(format!(
                "arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/t|3|${{Literal}}|{REGION}"
            ))
        );
        assert_eq!(
            s.eval(&json!({"Fn::Sub": ["${X}-y", {"X": {"Ref": "Stage"}}]})),
            json!("dev-y")
        );
    }

    #[test]
    fn mappings_and_conditions_follow_the_stage() {
        let s = stack();
        let n = json!({"Fn::FindInMap": ["S", {"Ref": "Stage"}, "N"]});
        assert_eq!(s.eval(&n), json!("1"));
        assert_eq!(s.eval(&json!({"Fn::If": ["Prod", "a", "b"]})), json!("b"));
        let prod = Stack::new(s.template.clone(), &[("Stage", "production")]);
        assert_eq!(prod.eval(&n), json!("5"));
        assert_eq!(
            prod.eval(&json!({"Fn::If": ["Prod", "a", "b"]})),
            json!("a")
        );
    }
}
