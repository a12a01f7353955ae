"""Where cells run: the target kinds (:mod:`.registry`: ``local``, ``ssh``, ``ec2``, ``fleet``) and the
providers that manage machines' lives (:mod:`.base`: the ``Provider`` protocol, ``ProviderError``;
:mod:`.ec2`: EC2 launch, stop, resize, cost; :mod:`.fleet`: SSH fleets)."""
