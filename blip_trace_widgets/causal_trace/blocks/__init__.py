"""One class per traced block, behind one small protocol (:mod:`.base`): BLIP's (:mod:`.blip`), BLIP-2's and
InstructBLIP's (:mod:`.blip2`), the vision encoder (:mod:`.vision`), and the table that picks them
(:mod:`.registry`)."""
