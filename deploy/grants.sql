-- The tailcache user needs exactly these (see README).
GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'tailcache'@'%';
GRANT SELECT ON appdb.* TO 'tailcache'@'%';
