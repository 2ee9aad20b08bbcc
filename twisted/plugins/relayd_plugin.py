"""twistd plugin for relayd: ``twistd -n relayd --config FILE``.

Only a dotted name here: this file is imported whenever any process rebuilds
the plugin cache, so it must not import the reactor or relayd itself.
"""

from twisted.application.service import ServiceMaker

relayd = ServiceMaker(
    "relayd",
    "relayd.tap",
    "SMTP relay: ESMTP listeners, durable spool, smarthost or maildir delivery",
    "relayd",
)
