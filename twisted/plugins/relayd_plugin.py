"""twistd plugin for relayd: ``twistd -n relayd --config FILE``.

The service maker itself is :data:`relayd.plugin.SERVICE_MAKER` (shared with
``relayd run``); that module imports neither the reactor nor the rest of
relayd, because this file is imported whenever the plugin cache is rebuilt.
"""

from relayd.plugin import SERVICE_MAKER as relayd

__all__ = ["relayd"]
