-- The tailcache user needs exactly these (see README).
GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'tailcache'@'%';
GRANT SELECT ON appdb.* TO 'tailcache'@'%';
-- MySQL only: snapshots read their start position under a brief LOCK TABLES ... READ
-- (MariaDB reports the snapshot's exact binlog position and does not need it).
GRANT LOCK TABLES ON appdb.* TO 'tailcache'@'%';
