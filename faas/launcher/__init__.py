"""The embedded platform: starting etcd, Valkey, SeaweedFS and the services as local processes
(``embedded``), and keeping them running (``supervisor``).  No platform service imports this package."""
