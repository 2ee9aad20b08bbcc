"""The one twistd service maker for relayd.

Both ``twistd relayd`` (through ``twisted/plugins/relayd_plugin.py``) and
``relayd run`` use this object, so the two ways to start relayd cannot
drift apart.  It names ``relayd.tap`` by its dotted path only: the plugin
file is imported whenever any process rebuilds Twisted's plugin cache, so
this module must not import the reactor or the rest of relayd.
"""

from twisted.application.service import ServiceMaker

SERVICE_MAKER = ServiceMaker(
    "relayd",
    "relayd.tap",
    "SMTP relay: ESMTP listeners, durable spool, smarthost or maildir delivery",
    "relayd",
)
