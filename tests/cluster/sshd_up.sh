#!/usr/bin/env bash
# A private sshd on 127.0.0.1:SSH_PORT for root with key auth, plus an ssh client config in which the hosts
# node1 and node2 are 127.0.0.1:SSH_PORT. Touches neither ~/.ssh nor /etc/ssh. Idempotent.
#   SSH_DIR=/tmp/x SSH_PORT=2222 bash tests/cluster/sshd_up.sh      then: ssh -F $SSH_DIR/ssh_config node1
# Needs openssh-server, openssh-client (tests/cluster/install_packages.sh).
set -euo pipefail
D=${SSH_DIR:?set SSH_DIR to the sshd state directory}
PORT=${SSH_PORT:-2222}
mkdir -p "$D" /run/sshd; chmod 700 "$D"
[ -f "$D/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$D/host_ed25519"
[ -f "$D/id_ed25519" ]   || ssh-keygen -q -t ed25519 -N '' -f "$D/id_ed25519"
cp "$D/id_ed25519.pub" "$D/authorized_keys"; chmod 600 "$D/authorized_keys"
cat > "$D/sshd_config" <<EOC
Port $PORT
ListenAddress 127.0.0.1
HostKey $D/host_ed25519
PidFile $D/sshd.pid
AuthorizedKeysFile $D/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitUserEnvironment no
EOC
cat > "$D/ssh_config" <<EOC
# the test's two "hosts": both this machine's loopback, through the private sshd
Host node1 node2
  HostName 127.0.0.1
  Port $PORT
Host *
  User root
  IdentityFile $D/id_ed25519
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOC
if ! { [ -s "$D/sshd.pid" ] && kill -0 "$(cat "$D/sshd.pid")" 2>/dev/null; }; then
  /usr/sbin/sshd -f "$D/sshd_config" -E "$D/sshd.log"
fi
for _ in $(seq 50); do ssh -F "$D/ssh_config" node1 true 2>/dev/null && exit 0; sleep 0.1; done
ssh -F "$D/ssh_config" node1 true
