"""Every frame of the protocol: the unions the core decodes and encodes.

Decoding a union makes ``type`` mandatory and picks the frame by it. The
frames themselves live in :mod:`chatd.protocol.frames` (sessions, keys,
messages), :mod:`chatd.protocol.rooms`, :mod:`chatd.protocol.push`,
:mod:`chatd.protocol.blobs` and :mod:`chatd.protocol.consent`.
"""

from __future__ import annotations

from chatd.protocol import blobs as b
from chatd.protocol import consent as c
from chatd.protocol import export as x
from chatd.protocol import frames as f
from chatd.protocol import push as p
from chatd.protocol import rooms as r

#: Every frame a client may send.
ClientFrame = (
    f.Ping
    | f.Bye
    | f.Login
    | f.Register
    | f.Resume
    | f.Refresh
    | f.Logout
    | f.ListSessions
    | f.RevokeSessions
    | f.ChangePassword
    | f.MfaEnroll
    | f.MfaConfirm
    | f.MfaDisable
    | f.NewRecoveryCodes
    | f.KeysUpload
    | f.KeysClaim
    | f.Directory
    | f.Send
    | f.Ack
    | f.Typing
    | f.WhoIsOnline
    | f.RemoveDevice
    | r.RoomCreate
    | r.ListRooms
    | r.ListRoomMembers
    | r.RoomInvite
    | r.RoomJoin
    | r.RoomLeave
    | r.RoomRemove
    | r.RoomSetRole
    | r.RoomSetTopic
    | r.RoomDelete
    | r.RoomSend
    | p.PushRegister
    | p.PushRemove
    | b.BlobUpload
    | b.BlobDownload
    | c.ConsentAccept
    | c.ConsentRevoke
    | c.ConsentStatus
    | x.ExportAccount
)

#: Every frame the server may send.
ServerFrame = (
    f.Hello
    | f.Pong
    | f.Error
    | f.Session
    | f.Tokens
    | f.Ok
    | f.Sessions
    | f.Revoked
    | f.MfaEnrollment
    | f.RecoveryCodes
    | f.KeyCount
    | f.KeysClaimed
    | f.Members
    | f.Sent
    | f.DeviceMismatch
    | f.Deliver
    | f.TypingNotice
    | f.Presence
    | r.Room
    | r.Rooms
    | r.RoomMembers
    | r.RoomInvited
    | b.BlobUrl
    | c.Consent
    | c.ConsentRequired
    | x.ExportUrl
)
