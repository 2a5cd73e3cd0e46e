"""The kinds of corruption (noise, swaps, blur, grey): each knows its name, level, tooltip and JSON form."""
