"""The Kubernetes node source: the kubelet's CRI log files under ``/var/log/pods``.

:mod:`.cri` parses the CRI log format (sans-I/O), :mod:`.pods` decides what to follow from
listings of the pods directory (pure), :mod:`.metadata` names a log file's pod and
container (path metadata, tags, records) and :mod:`.source` is the I/O around them.
"""
